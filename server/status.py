"""``fedhelix status``: the consortium as the admin sees it from their own machine.

What Flower's ``flwr supernode ls`` and ``flwr ls`` report through the admin listener (nodes
registered and online, runs and their status), beside the roster of the admin kit, plus the
newest run directory on this machine (its last round's mean metrics), its metrics and report
first brought up to date from the server's copy (a run still going shows its latest round).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from server.admin_tunnel import AdminKit, control_home, fetch_results, flwr_json, load_admin_kit
from server.submit import load_roster


@dataclass(frozen=True)
class LocalRun:
    """The newest run directory on this machine and how far it got."""

    path: Path
    rounds_done: int
    mean: dict[str, float]
    status: str  # the report's status, or "running / interrupted" before there is one


@dataclass(frozen=True)
class ConsortiumStatus:
    kit: AdminKit
    roster: tuple[str, ...]
    nodes: list[dict]  # flwr supernode ls --format json: node-id, status (online, offline, registered), online-at ...
    runs: list[dict]  # flwr ls --format json: run-id, status, pending-at, finished-at ...
    newest_local: LocalRun | None

    @property
    def online(self) -> int:
        return sum(1 for node in self.nodes if node.get("status") == "online")


def newest_run_dir(runs_dir: Path) -> Path | None:
    """The most recently changed run directory under ``runs_dir`` (one that ``fedhelix run`` or the ServerApp wrote)."""
    candidates = [p for p in Path(runs_dir).glob("*") if (p / "run-identity.json").exists() or (p / "metrics.jsonl").exists()]
    return max(candidates, key=lambda p: max(f.stat().st_mtime for f in p.iterdir())) if candidates else None


def refresh_from_server(kit: AdminKit, run_dir: Path) -> list[str]:
    """Fetch the run's metrics and report from the server into ``run_dir`` (names fetched; none for an older kit or no identity)."""
    try:
        nonce = str(json.loads((run_dir / "run-identity.json").read_text())["nonce"])
    except (OSError, ValueError, KeyError, TypeError):
        return []
    return fetch_results(kit, nonce, run_dir, names=("metrics.jsonl", "report.json"))


def newest_local_run(runs_dir: Path) -> LocalRun | None:
    """How far the newest run directory under ``runs_dir`` got, by its metrics and report."""
    newest = newest_run_dir(runs_dir)
    if newest is None:
        return None
    lines = (newest / "metrics.jsonl").read_text().splitlines() if (newest / "metrics.jsonl").exists() else []
    last = json.loads(lines[-1]) if lines else {}
    mean = {k: v for k, v in last.get("evaluate", {}).get("mean", {}).items() if isinstance(v, int | float)}
    status = "running or interrupted"
    if (newest / "report.json").exists():
        status = str(json.loads((newest / "report.json").read_text()).get("status", "unknown"))
    return LocalRun(newest, int(last.get("round", 0)), mean, status)


def consortium_status(kit_path: Path, runs_dir: Path | None = Path("runs")) -> ConsortiumStatus:
    kit = load_admin_kit(kit_path)
    with control_home(kit) as home:
        nodes = flwr_json(home, ["supernode", "ls"], "listing the nodes", kit.address).get("nodes", [])
        runs = flwr_json(home, ["ls"], "listing the runs", kit.address).get("runs", [])
    runs = sorted(runs, key=lambda r: str(r.get("pending-at", "")), reverse=True)
    if runs_dir is not None and Path(runs_dir).is_dir() and (newest := newest_run_dir(runs_dir)) is not None:
        refresh_from_server(kit, newest)
    local = newest_local_run(runs_dir) if runs_dir is not None and Path(runs_dir).is_dir() else None
    return ConsortiumStatus(kit, tuple(load_roster(kit.path)), list(nodes), list(runs), local)
