"""Best-round model selection: keep the global model of the round the sites' validation splits liked best.

With ``[study] select_best = true`` every site scores each round's global model on a
validation split carved from its *training* rows (``shared/validation.py``) and
releases the primary metric with its evaluation metrics. After each round this
keeper pools the sites' validation metric (weighted by their validation rows) and,
when it improves, keeps that round's weights (also on disk, so a resumed run keeps
its best). The saved model, and the final test metrics in the report, are then the
selected round's: chosen without looking at any test split.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shared.metrics import PRIMARY
from shared.params import NDArrays

log = logging.getLogger("fedhelix.server")

BEST_FILE = "best-round.pt"


def pooled_validation(per_site: dict[str, dict[str, Any]], metric: str) -> float | None:
    """The sites' validation ``metric``, weighted by each site's validation rows; None if no site has it."""
    pairs = [(float(m["val_" + metric]), float(m.get("n_val", 1) or 1)) for m in per_site.values() if isinstance(m.get("val_" + metric), (int, float))]
    if not pairs:
        return None
    values, weights = np.array(pairs).T
    return float((values * weights).sum() / weights.sum())


class BestRoundKeeper:
    """Called after each completed round (beside the checkpointer); remembers the best round and its weights."""

    def __init__(self, run_dir: Path, task: str, resume: bool = False) -> None:
        self.path = Path(run_dir) / BEST_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.metric, self.higher_is_better = PRIMARY[task]
        self.round: int | None = None
        self.value: float | None = None
        self.weights: NDArrays | None = None
        if resume and self.path.is_file():
            saved = torch.load(self.path, map_location="cpu", weights_only=True)
            self.round, self.value = int(saved["round"]), float(saved["value"])
            self.weights = [t.numpy() for t in saved["weights"]]
        elif not resume:
            self.path.unlink(missing_ok=True)

    def better(self, value: float) -> bool:
        if self.value is None:
            return True
        return value > self.value if self.higher_is_better else value < self.value

    def offer(self, server_round: int, per_site: dict[str, dict[str, Any]], weights: NDArrays) -> bool:
        """Consider one round's global model; True if it is the best so far (ties keep the earlier round)."""
        value = pooled_validation(per_site, self.metric)
        if value is None or not self.better(value):
            log.info("round %d: validation %s %s (best: round %s)", server_round, self.metric, "n/a" if value is None else f"{value:.4f}", self.round)
            return False
        self.round, self.value, self.weights = server_round, value, [np.array(w, copy=True) for w in weights]
        torch.save({"round": server_round, "value": value, "weights": [torch.from_numpy(w) for w in self.weights]}, self.path)
        log.info("round %d: validation %s %.4f, the best so far", server_round, self.metric, value)
        return True

    def __call__(self, server_round: int, context: Any, recorder: Any) -> None:
        import flwr.compat.common.recorddict_compat as compat
        from flwr.common import parameters_to_ndarrays
        from flwr.server.workflow.constant import MAIN_PARAMS_RECORD

        if not recorder.rounds or recorder.rounds[-1].get("round") != server_round:
            return  # no evaluation this round: nothing to select on
        record = context.state.array_records[MAIN_PARAMS_RECORD]
        weights = parameters_to_ndarrays(compat.arrayrecord_to_parameters(record, keep_input=True))
        self.offer(server_round, recorder.rounds[-1]["evaluate"]["sites"], weights)
        recorder.selected_round = self.round

    def selection(self) -> dict[str, Any]:
        """What the report says about the choice."""
        return {"round": self.round, "metric": "val_" + self.metric, "value": self.value}
