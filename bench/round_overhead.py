"""Fixed cost of a deployed round on the path a hospital runs: fedhelix's fast path vs stock Flower, one run.

Each flavour is a consortium of its own, started with the product's own functions:
``fedhelix provision`` (:func:`server.provision.provision`) for the kits, ``fedhelix
server`` (:func:`server.deployment.start_server`: SuperLink with TLS and node
authentication behind the TLS gateway), three ``fedhelix node`` processes (the approval
gate; default: warm launcher and short polls, ``--stock``: Flower's stock SuperNode),
``fedhelix approve`` (:func:`client.approval.approve`) and ``fedhelix run``
(:func:`server.submit.submit_study`). The study is tiny (logistic model, one local
step: compute is milliseconds), so a round's time is overhead. Per round = the gaps
between the rounds' timestamps in ``metrics.jsonl`` after round 1 (round 1 also
carries the handshake), median. Stock also runs the ServerApp's stock 3 s loop
(run config ``poll-interval=0``). Records ``round_overhead_s`` (fast),
``round_overhead_stock_s`` and ``round_overhead_secagg_s`` (fast, SecAgg+: five
exchanges per round instead of two).

    python bench/round_overhead.py [--rounds 5] [--no-stock] [--no-secagg] [--no-record]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.results import record  # noqa: E402
from client.approval import approve  # noqa: E402
from server.deployment import RunningServer, start_server  # noqa: E402
from server.provision import ConsortiumConfig, provision  # noqa: E402
from server.submit import Submission, submit_study  # noqa: E402
from shared.approval import code_digest_of_project  # noqa: E402
from shared.config import load_site  # noqa: E402
from tests.e2e.deployed import free_port, start_node, stop_nodes  # noqa: E402

SITES = ("hospital_a", "hospital_b", "hospital_c")  # WDBC's three hospitals
WDBC = ROOT / "data" / "wdbc"


def write_site_file(folder: Path, name: str) -> Path:
    """The WDBC hospital's site file, as its IT would write it (absolute data path)."""
    path = folder / f"{name}.toml"
    path.write_text(
        f'[site]\nname = "{name}"\n\n[data]\npath = "{WDBC / f"{name}.csv"}"\nlabel = "malignant"\ndrop = ["patient_id"]\n'
        'missing = "drop"\nnormalize = "site"\ntest_fraction = 0.25\nsplit_seed = 42\n'
    )
    return path


def write_tiny_study(folder: Path, rounds: int, name: str = "tiny", secure: bool = False) -> Path:
    """A logistic model over WDBC's three hospitals, one local step: compute is milliseconds, so a round is overhead.

    Without secure aggregation a round is two exchanges (train, evaluate); with SecAgg+ five.
    """
    folder.mkdir(parents=True, exist_ok=True)
    blocks = "".join(f'\n[[sites]]\nname = "{s}"\nconfig = "{s}.toml"\n' for s in SITES)
    study = folder / f"{name}.toml"
    study.write_text(
        f'[study]\nname = "{name}"\ntask = "binary"\nmodel = "logistic"\nrounds = {rounds}\nstrategy = "fedavg"\n'
        f"local_steps = 1\nbatch_size = 32\nlearning_rate = 0.1\nseed = 1\nsecure_aggregation = {str(secure).lower()}\n{blocks}"
    )
    return study


def round_times(metrics: Path) -> list[float]:
    """Seconds each round took after the first (round 1 also carries the handshake)."""
    elapsed = [json.loads(line)["elapsed_s"] for line in metrics.read_text().splitlines() if line.strip()]
    return [b - a for a, b in zip(elapsed, elapsed[1:])]


@dataclass
class Consortium:
    """A provisioned consortium on 127.0.0.1: ``fedhelix server`` and three ``fedhelix node``; a context manager."""

    root: Path
    fast: bool = True
    studies: list[Path] = field(default_factory=list)  # approved by every site before the nodes start
    server: RunningServer | None = None
    nodes: dict = field(default_factory=dict)

    def __enter__(self) -> Consortium:
        sites_dir = self.root / "sites"
        sites_dir.mkdir(parents=True, exist_ok=True)
        config = ConsortiumConfig(name="bench", server_address=f"127.0.0.1:{free_port()}", sites=SITES, link_port=free_port())
        provision(config, self.root / "kits")
        digest = code_digest_of_project(ROOT)
        files = {name: write_site_file(sites_dir, name) for name in SITES}
        for study in self.studies:
            for name in SITES:
                approve(study, load_site(files[name]), digest)
        try:
            self.server = start_server(self.root / "kits" / "server")
            env = dict(os.environ)
            env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}"
            for name in SITES:
                extra = () if self.fast else ("--stock",)
                self.nodes[name] = start_node(self.root / "kits" / name, files[name], free_port(), self.root / f"node-{name}.log", env=env, extra=extra)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *_exc: object) -> None:
        previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the teardown short
        try:
            stop_nodes(self.nodes)
            self.nodes.clear()
            if self.server is not None:
                self.server.stop()
                self.server = None
        finally:
            signal.signal(signal.SIGTERM, previous)

    def run(self, study: Path, out: Path, timeout_s: float = 1200) -> Submission:
        """``fedhelix run`` of ``study``; stock also runs the ServerApp's stock 3 s loop."""
        extra = {} if self.fast else {"poll-interval": 0}
        with (self.root / f"run-{study.stem}.log").open("a") as log:  # `flwr run --stream`: the ServerApp's log

            def line(text: str) -> None:
                log.write(f"{time.time():.3f} {text}\n")

            return submit_study(study, self.root / "kits" / "admin", out, timeout_s=timeout_s, run_config=extra, on_line=line)

    def cpu_seconds(self) -> dict[str, float]:
        """CPU seconds used so far by each part: SuperLink (with its ServerApps), gateway, nodes (SuperNode, launcher, ClientApps)."""
        assert self.server is not None
        parts = {"superlink+serverapp": self.server.superlink.pid, "gateway": self.server.gateway.pid}
        parts.update({f"node {name}": proc.pid for name, proc in self.nodes.items()})
        return {part: _tree_cpu(pid) for part, pid in parts.items()}

    def logs(self, tail: int = 3000) -> str:
        return "\n".join(f"== {p.name}\n{p.read_text(errors='replace')[-tail:]}" for p in sorted(self.root.rglob("*.log")))


def _tree_cpu(pid: int) -> float:
    """User + system CPU seconds of a process and its descendants, reaped children included."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0.0
    for proc in procs:
        try:
            t = proc.cpu_times()
            total += t.user + t.system + t.children_user + t.children_system
        except psutil.NoSuchProcess:
            pass
    return total


def measure(consortium: Consortium, study: Path, out: Path) -> dict:
    """Run ``study`` to completion; per-round seconds (median after round 1), the run's wall time and CPU by part."""
    cpu_before = consortium.cpu_seconds()
    started = time.time()
    try:
        submission = consortium.run(study, out)
    except Exception as err:
        raise RuntimeError(f"{study.name} failed: {err}\n{consortium.logs()}") from err
    wall = time.time() - started
    cpu = {part: round(used - cpu_before.get(part, 0.0), 1) for part, used in consortium.cpu_seconds().items()}
    gaps = round_times(submission.out_dir / "metrics.jsonl")
    return {"per_round_s": statistics.median(gaps), "gaps_s": [round(g, 2) for g in gaps], "run_wall_s": round(wall, 1), "cpu_s": cpu}


def load() -> str:
    return "load average " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-stock", action="store_true", help="skip stock Flower (its rounds take ~40 s each)")
    parser.add_argument("--no-secagg", action="store_true", help="skip the SecAgg+ study")
    parser.add_argument("--no-record", action="store_true")
    parser.add_argument("--keep", type=Path, help="work in this (new) folder and keep it: kits, logs, run directories")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so a killed bench still stops its deployment
    figures: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="fedhelix-round-overhead-") as tmp:
        tmp_path = args.keep or Path(tmp)
        plain = write_tiny_study(tmp_path / "sites", args.rounds)
        secure = write_tiny_study(tmp_path / "sites", args.rounds, name="tiny-secagg", secure=True)
        print(f"start: {load()}", flush=True)
        with Consortium(tmp_path / "fast", fast=True, studies=[plain, secure]) as fast_path:
            fast = measure(fast_path, plain, tmp_path / "fast" / "runs")
            print(f"fast : {fast['per_round_s']:.2f} s per round (rounds 2..{args.rounds}: {fast['gaps_s']}; run {fast['run_wall_s']} s; {load()})", flush=True)
            print(f"       CPU seconds over the run: {fast['cpu_s']}", flush=True)
            figures["round_overhead_s"] = round(fast["per_round_s"], 2)
            if not args.no_secagg:
                secagg = measure(fast_path, secure, tmp_path / "fast" / "runs")
                print(f"fast, SecAgg+: {secagg['per_round_s']:.2f} s per round ({secagg['gaps_s']}; run {secagg['run_wall_s']} s; {load()})", flush=True)
                print(f"       CPU seconds over the run: {secagg['cpu_s']}", flush=True)
                figures["round_overhead_secagg_s"] = round(secagg["per_round_s"], 2)
        if not args.no_stock:
            with Consortium(tmp_path / "stock", fast=False, studies=[plain]) as stock_path:
                stock = measure(stock_path, plain, tmp_path / "stock" / "runs")
            print(f"stock: {stock['per_round_s']:.2f} s per round (rounds 2..{args.rounds}: {stock['gaps_s']}; run {stock['run_wall_s']} s; {load()})", flush=True)
            print(f"       CPU seconds over the run: {stock['cpu_s']}", flush=True)
            print(f"stock / fast = {stock['per_round_s'] / fast['per_round_s']:.1f}x")
            figures["round_overhead_stock_s"] = round(stock["per_round_s"], 2)
    if not args.no_record:
        record(figures)
        print("recorded", figures)


if __name__ == "__main__":
    main()
