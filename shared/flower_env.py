"""Environment every Flower process we start must have: offline-safe and quiet."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from shared.paths import PROJECT_ROOT

FLOWER_ENV = {
    # Otherwise the first run `uv sync`s the app and pulls a multi-GB CUDA torch.
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    # Ray: no dashboard, no usage stats, no network calls.
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_DEDUP_LOGS": "0",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
}


def apply_flower_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """Set the variables in ``environ`` (default: this process) and return it."""
    target = os.environ if environ is None else environ
    for key, value in FLOWER_ENV.items():
        target[key] = value
    return target  # type: ignore[return-value]


def flower_process_env(flwr_home: Path | None = None) -> dict[str, str]:
    """Environment for a Flower process we start: the variables above, this venv's Flower
    executables first on PATH, this checkout importable, and an optional private FLWR_HOME."""
    env = apply_flower_env(dict(os.environ))
    if flwr_home is not None:
        env["FLWR_HOME"] = str(flwr_home)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), env.get("PYTHONPATH", "")]))
    return env
