"""How many hostile-coordinator attacks the sites refuse: the test harness, run as a benchmark.

Runs every attack of ``tests/e2e/hostile.py`` against the three WDBC hospitals in a
Flower simulation, once with a plain DP study and once with a SecAgg+ DP study
(whose list adds the SecAgg+ protocol attacks: crafted setups, unmask lists, substituted keys),
and records ``hostile_attacks_tried`` (crafted requests sent, summed over sites) and
``hostile_attacks_refused`` (answered with a sealed refusal and nothing else).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from bench.results import record  # noqa: E402
from e2e.hostile import ATTACKS, SECURE_ATTACKS, run_in_simulation, wdbc_dp_study  # noqa: E402
from shared.config import load_study  # noqa: E402


def main() -> None:
    tried = refused = 0
    for secure in (False, True):
        attacks = SECURE_ATTACKS if secure else ATTACKS
        with tempfile.TemporaryDirectory() as tmp:
            study = load_study(wdbc_dp_study(ROOT, Path(tmp), secure=secure))
            for outcome in run_in_simulation(study, f"{tmp}/ledgers", f"{tmp}/audit", attacks):
                tried += outcome.sent
                refused += len(outcome.codes) if outcome.refused else 0
                print(f"{'secure' if secure else 'plain '} {outcome.name:40s} sent {outcome.sent:3d} refused {len(outcome.codes):3d} {(outcome.leaked + outcome.broken)[:1]}")
    print(f"refused {refused} of {tried} crafted requests")
    record({"hostile_attacks_tried": tried, "hostile_attacks_refused": refused})


if __name__ == "__main__":
    main()
