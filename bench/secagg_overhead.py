"""Round wall time with SecAgg+ over without, same study, measured side by side in one run.

A synthetic binary task (an MLP over ``--features`` features with ``--hidden``
layers, about 235k parameters by default, near the 264k of Flower's own
measurement) is split over N simulated sites; each study
runs ``--rounds`` rounds with secure aggregation on and off. The per-round time
excludes round 1 (start-up). Writes ``secagg_overhead_10_sites`` (and the 50 and
100-site ratios when asked) to bench/results.json; ``--record KEY ...`` writes only those keys.
Both sides mask with fedhelix's ChaCha20 mask PRG (``shared/secure_aggregation.py``).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.results import record  # noqa: E402
from server.simulate import simulate  # noqa: E402


def write_federation(root: Path, n_sites: int, n_features: int, rows: int, secure: bool, rounds: int, hidden: list[int]) -> Path:
    rng = np.random.default_rng(0)
    weights = rng.normal(size=n_features)
    sites = []
    for i in range(n_sites):
        x = rng.normal(size=(rows, n_features))
        y = (x @ weights + rng.normal(size=rows) > 0).astype(int)
        frame = pd.DataFrame(x, columns=[f"f{j}" for j in range(n_features)])
        frame["y"] = y
        frame.to_parquet(root / f"site{i}.parquet")
        (root / f"site{i}.toml").write_text(f'[site]\nname = "site{i}"\n[data]\npath = "site{i}.parquet"\nlabel = "y"\nnormalize = "none"\n')
        sites.append(f'[[sites]]\nname = "site{i}"\nconfig = "site{i}.toml"\n')
    study = root / "study.toml"
    study.write_text(
        f'[study]\nname = "secagg-bench"\ntask = "binary"\nmodel = "mlp"\nrounds = {rounds}\nstrategy = "fedavg"\n'
        f'local_steps = 5\nbatch_size = 32\nlearning_rate = 0.05\nsecure_aggregation = {str(secure).lower()}\n'
        f'[model]\nhidden = {hidden}\n\n' + "\n".join(sites)
    )
    return study


def round_time(n_sites: int, n_features: int, secure: bool, rounds: int, hidden: list[int]) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        study = write_federation(Path(tmp), n_sites, n_features, 60, secure, rounds, hidden)
        simulate(study, Path(tmp) / "run", progress=False, check=False)
        lines = [json.loads(line) for line in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
    elapsed = [entry["elapsed_s"] for entry in lines]
    return (elapsed[-1] - elapsed[0]) / (len(elapsed) - 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, nargs="+", default=[10])
    parser.add_argument("--features", type=int, default=100)
    parser.add_argument("--hidden", type=int, nargs="+", default=[1024, 128])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=1, help="run each study this many times (alternating) and keep the medians")
    parser.add_argument("--record", nargs="+", default=None, help="write only these keys to bench/results.json")
    args = parser.parse_args()
    figures = {}
    for n in args.sites:
        times = {False: [], True: []}
        for _ in range(args.repeats):  # alternate, so a busy spell on a shared machine hits both
            for secure_run in (False, True):
                times[secure_run].append(round_time(n, args.features, secure_run, args.rounds, args.hidden))
        plain, secure = float(np.median(times[False])), float(np.median(times[True]))
        widths = [args.features, *args.hidden, 1]
        n_params = sum(a * b + b for a, b in zip(widths, widths[1:]))
        figures["secagg_bench_parameters"] = n_params
        print(f"{n} sites, {n_params} parameters: plain {plain:.2f} s/round, SecAgg+ {secure:.2f} s/round -> {secure / plain:.2f}x (median of {args.repeats}; plain {[round(t, 2) for t in times[False]]}, SecAgg+ {[round(t, 2) for t in times[True]]})", flush=True)
        figures[f"secagg_overhead_{n}_sites"] = round(secure / plain, 3)
        figures[f"secagg_round_s_{n}_sites"] = round(secure, 3)
        figures[f"plain_round_s_{n}_sites"] = round(plain, 3)
    record({k: v for k, v in figures.items() if args.record is None or k in args.record})


if __name__ == "__main__":
    main()
