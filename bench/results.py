"""``bench/results.json``: one flat JSON object that every benchmark merges its figures into."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results.json"


def record(figures: dict[str, float | int | str], path: Path = RESULTS) -> dict:
    """Merge ``figures`` into the results file (keys from other scripts are kept)."""
    current = json.loads(path.read_text()) if path.exists() else {}
    current.update(figures)
    current["_machine"] = f"{platform.machine()}, {platform.python_implementation()} {platform.python_version()}, measured {time.strftime('%Y-%m-%d')}"
    path.write_text(json.dumps(dict(sorted(current.items())), indent=2) + "\n")
    return current
