"""What happened in a run, round by round: per-site metrics, failures, timing.

The recorder is the server's memory of a study. It appends one JSON line per
completed round to ``metrics.jsonl`` (so progress can be followed live and
nothing is lost if the run dies) and hands the whole history to the report.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from shared.errors import extract_error_line
from shared.metrics import BASELINE, INTERVAL_PREFIXES, PRIMARY

log = logging.getLogger("fedhelix.server")


@dataclass
class SiteInfo:
    """What a site told the coordinator in the handshake (counts only)."""

    node_id: int
    name: str
    n_train: int
    n_test: int
    features: list[str]
    warnings: list[str] = field(default_factory=list)
    order: int = 0  # position in the study's list of sites
    normalize: str = "site"
    indicators: list[bool] = field(default_factory=list)  # per feature, in the agreed order
    labels: list[str] = field(default_factory=list)  # label columns (the tasks of a multitask study)
    candidates: list[str] = field(default_factory=list)  # omics feature names (federated selection)
    flags: dict[str, bool] = field(default_factory=dict)  # is a feature 0/1 here, by name
    join_dropped: int = 0  # patients the join of the site's tables dropped


def summarise(per_site: dict[str, dict[str, Any]], weights: dict[str, int]) -> dict[str, dict[str, float]]:
    """Unweighted mean and example-weighted mean of every metric over the sites that have it.

    Baselines (``baseline_*``) average like the model's metrics. A site's bootstrap interval
    (``ci_*``) does not: the mean of interval ends is no interval of the mean, so the
    means carry none.
    """
    names = sorted({k for m in per_site.values() for k, v in m.items() if isinstance(v, (int, float)) and k != "n" and not k.startswith(INTERVAL_PREFIXES)})
    mean, weighted = {}, {}
    for name in names:
        pairs = [(m[name], weights.get(site, 0)) for site, m in per_site.items() if isinstance(m.get(name), (int, float))]
        if not pairs:
            continue
        values = np.array([p[0] for p in pairs], dtype=float)
        w = np.array([p[1] for p in pairs], dtype=float)
        mean[name] = float(values.mean())
        weighted[name] = float((values * w).sum() / w.sum()) if w.sum() > 0 else float(values.mean())
    return {"mean": mean, "weighted": weighted}


class RunRecorder:
    """Collects per-round results and writes them as they happen."""

    def __init__(self, out_dir: Path, task: str) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.out_dir / "metrics.jsonl"
        self.metrics_path.write_text("")
        self.task = task
        self.sites: dict[int, SiteInfo] = {}
        self.rounds: list[dict[str, Any]] = []
        self.failures: list[dict[str, Any]] = []
        self._current: dict[str, Any] = {}
        self.secure: Any = None  # SecAgg+ parameters when secure aggregation is on
        self.started = time.time()
        self.listeners: list[Callable[[dict[str, Any]], None]] = []  # e.g. TensorBoard, called per completed round
        self.selected_round: int | None = None  # best-round selection: the round whose global model was kept

    def restore(self, rounds: list[dict[str, Any]], failures: list[dict[str, Any]]) -> None:
        """Continue from a checkpoint: its rounds become this run's history (and metrics.jsonl)."""
        self.rounds = [dict(r) for r in rounds]
        self.failures = [dict(f) for f in failures]
        with self.metrics_path.open("w") as fh:
            fh.writelines(json.dumps(entry) + "\n" for entry in self.rounds)

    def final_evaluation(self) -> dict[str, Any]:
        """The evaluation of the model the run keeps: the selected round's (best-round selection), else the last."""
        chosen = [r for r in self.rounds if r.get("round") == self.selected_round and "evaluate" in r]
        if chosen:
            return chosen[-1]["evaluate"]
        return self.rounds[-1]["evaluate"] if self.rounds else {"sites": {}, "mean": {}, "weighted": {}}

    # -- sites --------------------------------------------------------------
    def set_sites(self, sites: list[SiteInfo]) -> None:
        self.sites = {s.node_id: s for s in sites}

    def site_name(self, node_id: int) -> str:
        info = self.sites.get(node_id)
        return info.name if info else f"node {node_id}"

    # -- events -------------------------------------------------------------
    def observe_reply(self, message_type: str, server_round: int, node_id: int, error_reason: str) -> None:
        """A site replied with an error instead of a result: remember who and why."""
        text = (error_reason or "").strip()
        reason = extract_error_line(text) or (text.splitlines()[0][:300] if text else "no reason given")
        kind = "dropped" if reason.startswith("no reply") else "failed"
        entry = {"round": server_round, "phase": message_type, "site": self.site_name(node_id), "reason": reason, "kind": kind}
        self.failures.append(entry)
        log.warning("round %s %s: site '%s' failed: %s", server_round, message_type, entry["site"], reason)

    def record_fit(self, server_round: int, per_site: dict[str, dict[str, Any]], rejected: dict[str, str]) -> None:
        self._current = {"round": server_round, "started": self._current.get("started", time.time())}
        self._current["fit"] = {"sites": per_site, "rejected": rejected}
        for site, reason in rejected.items():
            self.failures.append({"round": server_round, "phase": "train", "site": site, "reason": reason, "kind": "rejected"})

    def record_evaluate(self, server_round: int, per_site: dict[str, dict[str, Any]]) -> None:
        weights = {s.name: s.n_test for s in self.sites.values()}
        entry = self._current if self._current.get("round") == server_round else {"round": server_round}
        order = [s.name for s in sorted(self.sites.values(), key=lambda s: s.order)]
        per_site = {name: per_site[name] for name in sorted(per_site, key=lambda n: order.index(n) if n in order else len(order))}
        entry["evaluate"] = {"sites": per_site, **summarise(per_site, weights)}
        entry["failures"] = [f for f in self.failures if f["round"] == server_round]
        entry["elapsed_s"] = round(time.time() - self.started, 3)
        self.rounds.append(entry)
        self._current = {}
        with self.metrics_path.open("a") as fh:
            fh.write(json.dumps(entry) + "\n")
        for listener in self.listeners:
            try:
                listener(entry)
            except Exception as err:  # noqa: BLE001 - a dashboard must never stop a study
                log.warning("round %d: tracking failed: %s", server_round, err)
        primary, _ = PRIMARY[self.task]
        value, reference = entry["evaluate"]["mean"].get(primary), entry["evaluate"]["mean"].get(BASELINE + primary)
        shown = f"{value:.4f}" if value is not None else "n/a"
        log.info("round %d: mean %s over sites = %s%s", server_round, primary, shown, f" (constant predictor {reference:.4f})" if reference is not None else "")
