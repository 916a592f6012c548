"""Test-only fault injection into one real node's processes (never part of the app bundle).

Put this directory on the ``PYTHONPATH`` of one ``fedhelix node``: Python imports
``sitecustomize`` at start-up in the node, its SuperNode, its launcher and so in
every ClientApp process forked from it. When the ClientApp module ``client.app``
is loaded (from the run's FAB), ``SiteClient.fit`` is wrapped to misbehave in the
studies and rounds named by the JSON file ``$FEDHELIX_FAULTS``::

    {"<study>": {"<round>": "nan" | "inf" | "huge" | "hang"}}

``nan``/``inf``/``huge`` corrupt the update *after* the site's own checks (a buggy
or hostile node sends it anyway). ``hang`` lets the site train, record the round
in its ledger and audit log, then writes ``<study>-<round>.hang`` beside the JSON
file and stops before replying: the test kills the node at that known point.
The file is read at every fit, so a test changes the plan without restarting.
"""

from __future__ import annotations

import importlib.abc
import json
import os
import sys
import time
from pathlib import Path

TARGET = "client.app"


def _faults(study: str, server_round: int) -> tuple[str | None, Path | None]:
    path = os.environ.get("FEDHELIX_FAULTS")
    if not path or not Path(path).exists():
        return None, None
    plan = json.loads(Path(path).read_text())
    return plan.get(study, {}).get(str(server_round)), Path(path).parent


def _patch(module) -> None:
    import numpy as np

    original = module.SiteClient.fit

    def fit(self, parameters, config):
        delta, weight, metrics = original(self, parameters, config)
        if module.ROUND_KEY not in config or config.get(module.STAGE_KEY) in ("stats", "select"):
            return delta, weight, metrics
        study = module.TrainingPlan.from_json(str(config[module.PLAN_KEY])).study
        fault, where = _faults(study, int(config[module.ROUND_KEY]))
        if fault == "nan":
            delta = [np.full_like(delta[0], np.nan), *delta[1:]]
        elif fault == "inf":
            delta = [*delta[:-1], np.full_like(delta[-1], np.inf)]
        elif fault == "huge":
            delta = [d * 1000 for d in delta]
        elif fault == "hang":
            (where / f"{study}-{int(config[module.ROUND_KEY])}.hang").write_text(str(os.getpid()))
            time.sleep(3600)
        return delta, weight, metrics

    module.SiteClient.fit = fit


class _PatchOnLoad(importlib.abc.MetaPathFinder):
    """Finds ``client.app`` with the other finders, then patches it right after it executes."""

    def find_spec(self, name, path, target=None):
        if name != TARGET:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None and spec.loader is not None:
                execute = spec.loader.exec_module

                def exec_module(module, execute=execute):
                    execute(module)
                    _patch(module)

                spec.loader.exec_module = exec_module
                return spec
        return None


sys.meta_path.insert(0, _PatchOnLoad())
