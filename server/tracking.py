"""Per-round metrics as TensorBoard event files, so existing dashboards can follow a study.

Every completed round the recorder hands its entry to the tracker, which
writes the mean and example-weighted mean of each metric over the sites, each
site's metrics, and the number of sites that failed, dropped or were rejected,
into ``RUN_DIR/tensorboard`` (``tensorboard --logdir RUN_DIR/tensorboard``).
A resumed run purges anything logged after its checkpoint, so a round that was
interrupted and repeated is not drawn twice.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

log = logging.getLogger("fedhelix.server")

TENSORBOARD_DIR = "tensorboard"


class TensorBoardTracker:
    """Writes one step per round with ``torch.utils.tensorboard.SummaryWriter``."""

    def __init__(self, log_dir: str | Path, start_round: int = 1) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # purge_step drops events at or after the resumed round left by an interrupted run
        self.writer = SummaryWriter(str(log_dir), purge_step=start_round if start_round > 1 else None)

    def __call__(self, entry: dict[str, Any]) -> None:
        step = int(entry["round"])
        evaluation = entry.get("evaluate", {})
        for summary in ("mean", "weighted"):
            for name, value in evaluation.get(summary, {}).items():
                self.writer.add_scalar(f"{summary}/{name}", value, step)
        for site, metrics in evaluation.get("sites", {}).items():
            for name, value in metrics.items():
                if isinstance(value, (int, float)) and name != "n":
                    self.writer.add_scalar(f"site/{site}/{name}", value, step)
        for site, metrics in entry.get("fit", {}).get("sites", {}).items():
            for name in ("train_loss", "update_norm", "epsilon"):
                if isinstance(metrics.get(name), (int, float)):
                    self.writer.add_scalar(f"site/{site}/{name}", metrics[name], step)
        failures = entry.get("failures", [])
        for kind in ("failed", "dropped", "rejected"):
            self.writer.add_scalar(f"sites/{kind}", sum(1 for f in failures if f.get("kind", "failed") == kind), step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def add_trackers(recorder: Any, out_dir: str | Path, start_round: int = 1) -> None:
    """Attach the run's trackers to ``recorder`` (TensorBoard when it is installed)."""
    try:
        tracker = TensorBoardTracker(Path(out_dir) / TENSORBOARD_DIR, start_round)
    except ImportError:  # tensorboard is a dependency; a stripped install still runs studies
        log.warning("tensorboard is not installed: no TensorBoard event files for this run")
        return
    recorder.listeners.append(tracker)
