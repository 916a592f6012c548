"""Where a deployed ServerApp keeps a run's results on the server host, and which of them the admin may fetch.

The run config's ``out`` is chosen on the admin's machine; on the server host it would be a
write-anywhere. So ``fedhelix server`` names one runs directory (``server.toml`` ``runs``)
in the SuperLink's environment (inherited by SuperExec and the ServerApp), and a deployed
run writes to ``RUNS/<study>/<run nonce>/`` (the nonce the admin signed). The admin fetches
the files of :data:`RESULT_FILES` over the admin listener (:mod:`server.admin_listener`).
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from shared.approval import NONCE_KEY
from shared.errors import FedhelixError

RUNS_ENV = "FEDHELIX_RUNS_DIR"  # set by `fedhelix server`; absent in simulation
RESULT_FILES = ("report.json", "report.html", "metrics.jsonl", "model.pt", "study.toml")  # what the admin may fetch, nothing else
NONCE = re.compile(r"[0-9a-f]{32}")
RESULTS_ROUTE = "/fedhelix/v1/runs/{nonce}/{name}"


def study_dirname(name: str) -> str:
    """The study name as one safe path component (a name with '/' or '..' must not leave the runs directory)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name).lstrip(".") or "study"


def runs_dir_from_env(env: Mapping[str, str] | None = None) -> Path | None:
    """The server's runs directory when this process runs under ``fedhelix server``; None otherwise (simulation)."""
    value = (os.environ if env is None else env).get(RUNS_ENV, "")
    return Path(value) if value else None


def deployed_run_dir(runs: Path, run_config: Mapping[str, Any], study_name: str) -> tuple[Path, bool]:
    """``RUNS/<study>/<nonce>`` of this run and whether it resumes there.

    ``resume`` names the run (its nonce, or any value from older admins): only this run's own
    directory can be resumed, never a path the admin chose.
    """
    nonce = str(run_config.get(NONCE_KEY, "") or "")
    if not NONCE.fullmatch(nonce):
        raise FedhelixError("the run carries no valid run identity (run-nonce); submit it with `fedhelix run`")
    resume = str(run_config.get("resume", "") or "")
    if NONCE.fullmatch(resume) and resume != nonce:
        raise FedhelixError(f"resume names run {resume}, but this run's identity is {nonce}; resume with the run directory that started it")
    run_dir = Path(runs) / study_dirname(study_name) / nonce
    if not resume and completed(run_dir):  # a completed run's config sent again (a replay): its results stay, and are what is served
        run_dir = run_dir.with_name(f"{nonce}.again-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}")
    return run_dir, bool(resume)


def completed(run_dir: Path) -> bool:
    try:
        return json.loads((run_dir / "report.json").read_text()).get("status") == "completed"
    except (OSError, ValueError, AttributeError):
        return False


def find_result(runs: Path, nonce: str, name: str) -> Path | None:
    """The file ``name`` of run ``nonce`` under ``runs``, if it is one the admin may fetch and it exists."""
    if name not in RESULT_FILES or not NONCE.fullmatch(nonce):
        return None
    found = [p for p in Path(runs).glob(f"*/{nonce}/{name}") if p.is_file()]  # nonce: hex only; name: from the allow-list
    return found[0] if len(found) == 1 else None
