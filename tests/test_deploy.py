"""Static checks of deploy/: artefacts agree with what the code sets."""

from __future__ import annotations

from pathlib import Path

from shared.flower_env import FLOWER_ENV


def test_flower_env_file_sets_what_the_code_sets(root: Path) -> None:
    lines = [line for line in (root / "deploy" / "flower.env").read_text().splitlines() if line and not line.startswith("#")]
    declared = dict(line.split("=", 1) for line in lines)
    assert declared  # the file is not empty
    for key, value in declared.items():
        assert FLOWER_ENV.get(key) == value, key
    for key in ("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "FLWR_TELEMETRY_ENABLED", "FLWR_DISABLE_UPDATE_CHECK"):
        assert key in declared

