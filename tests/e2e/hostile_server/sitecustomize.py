"""Test-only: the coordinator host's operator runs hostile code around an approved study (never in the app bundle).

Put this directory on the ``PYTHONPATH`` of ``fedhelix server`` (the SuperLink and
everything it starts). Python imports ``sitecustomize`` in each of those processes;
only in the ServerApp process (``flwr-serverapp``, the check Flower itself uses in
``flwr.supercore.exit``) does it act: when the approved FAB's ``server.app`` has
executed, its ``run_study`` is replaced by :func:`e2e.hostile.attack` on the same
grid. The FAB the admin signed and every site approved is untouched (the sites'
gate lets it run); what runs around it on the coordinator host is not.

``$FEDHELIX_HOSTILE_OUT``: where the outcomes go, as JSON (a list of
:class:`e2e.hostile.Outcome` fields, or ``{"error": traceback}`` if the attack
itself crashed). ``$FEDHELIX_HOSTILE_ATTACKS``: comma-separated attack names of
``e2e/hostile.py`` (default: its ``SECURE_ATTACKS``).
"""

from __future__ import annotations

import importlib.abc
import os
import sys
from pathlib import Path

TARGET = "server.app"
OUT_ENV = "FEDHELIX_HOSTILE_OUT"
ATTACKS_ENV = "FEDHELIX_HOSTILE_ATTACKS"
TESTS_DIR = Path(__file__).resolve().parents[2]  # tests/, where the e2e package lives


def _write(path: Path, payload: object) -> None:
    import json

    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    tmp.replace(path)  # the test never reads half a file


def hostile_run_study(grid, context, study, out_dir, observe=None, resume=False) -> dict:
    """Stands in for ``server.app.run_study``: the honest handshake, then every attack; outcomes to ``$FEDHELIX_HOSTILE_OUT``."""
    import dataclasses
    import traceback

    out = Path(os.environ[OUT_ENV])
    try:
        sys.path.insert(0, str(TESTS_DIR))
        from e2e import hostile
        from server.short_poll import ShortPollGrid, poll_interval

        if (interval := poll_interval(context.run_config)) is not None:
            grid = ShortPollGrid(grid, interval)  # as run_study does: Flower's HttpGrid waits 3 s between pulls
        names = [n for n in os.environ.get(ATTACKS_ENV, "").split(",") if n]
        attacks = [getattr(hostile, name) for name in names] if names else hostile.SECURE_ATTACKS
        outcomes = hostile.attack(grid, study, attacks)
        _write(out, [dataclasses.asdict(o) for o in outcomes])
    except BaseException:
        _write(out, {"error": traceback.format_exc()})
        raise
    return {}


class _PatchOnLoad(importlib.abc.MetaPathFinder):
    """Finds ``server.app`` with the other finders, then swaps its ``run_study`` right after it executes."""

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
                    module.run_study = hostile_run_study

                spec.loader.exec_module = exec_module
                return spec
        return None


if sys.argv and sys.argv[0].endswith("flwr-serverapp") and os.environ.get(OUT_ENV):
    sys.meta_path.insert(0, _PatchOnLoad())
