"""Fixed per-round overhead of a deployed study: stock Flower vs fedhelix's fast path, side by side.

One TLS SuperLink with SuperNode authentication and 3 SuperNodes on loopback run
a tiny study (logistic model, one local step: compute is milliseconds, so a
round's time is overhead). Per round = the gaps between the rounds' timestamps
in ``metrics.jsonl`` after round 1 (round 1 also carries the handshake), median.
Stock: ``flower-supernode`` (a fresh ``flwr-clientapp`` per message) and the
ServerApp's 3 s loop (``poll-interval=0``). Fast: ``client.fast_supernode``
(short polls) + ``client.launcher`` (warm, forked ClientApp processes) and the
0.1 s ServerApp loop. Records ``round_overhead_s`` (fast),
``round_overhead_stock_s`` and, with ``--secagg``, ``round_overhead_secagg_s``
(fast, SecAgg+: five exchanges per round instead of two).

    python bench/round_overhead.py [--rounds 5] [--secagg] [--no-record]
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.loopback import Loopback, round_times, write_tiny_study  # noqa: E402
from bench.results import record  # noqa: E402


def measure(workdir: Path, fast: bool, rounds: int, secure: bool = False) -> dict:
    """Start a deployment, run the study, return per-round seconds (median after round 1) and the run's wall time."""
    study, sites = write_tiny_study(workdir / "study", rounds, secure=secure)
    with Loopback(workdir, sites, study, fast=fast) as deployment:
        time.sleep(2)  # nodes connect
        started = time.time()
        done = deployment.run(study, workdir / "runs", timeout=1200)
        wall = time.time() - started
        report_path = workdir / "runs" / "tiny" / "report.json"
        status = json.loads(report_path.read_text())["status"] if report_path.exists() else "no report"
        if done.returncode != 0 or status != "completed":
            raise RuntimeError(f"{'fast' if fast else 'stock'} run failed ({done.returncode}, {status}):\n{done.stdout[-2000:]}\n{deployment.logs()}")
    gaps = round_times(workdir / "runs" / "tiny" / "metrics.jsonl")
    return {"per_round_s": statistics.median(gaps), "gaps_s": [round(g, 2) for g in gaps], "run_wall_s": round(wall, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--secagg", action="store_true", help="also time the fast path with SecAgg+ on")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so a killed bench still stops its deployment
    with tempfile.TemporaryDirectory(prefix="fedhelix-round-overhead-") as tmp:
        fast = measure(Path(tmp) / "fast", True, args.rounds)
        print(f"fast : {fast['per_round_s']:.2f} s per round (rounds 2..{args.rounds}: {fast['gaps_s']}; run {fast['run_wall_s']} s)", flush=True)
        stock = measure(Path(tmp) / "stock", False, args.rounds)
        print(f"stock: {stock['per_round_s']:.2f} s per round (rounds 2..{args.rounds}: {stock['gaps_s']}; run {stock['run_wall_s']} s)", flush=True)
        print(f"stock / fast = {stock['per_round_s'] / fast['per_round_s']:.1f}x")
        figures = {"round_overhead_s": round(fast["per_round_s"], 2), "round_overhead_stock_s": round(stock["per_round_s"], 2)}
        if args.secagg:
            secagg = measure(Path(tmp) / "fast-secagg", True, args.rounds, secure=True)
            print(f"fast, SecAgg+: {secagg['per_round_s']:.2f} s per round ({secagg['gaps_s']})")
            figures["round_overhead_secagg_s"] = round(secagg["per_round_s"], 2)
    if not args.no_record:
        record(figures)
        print("recorded", figures)


if __name__ == "__main__":
    main()
