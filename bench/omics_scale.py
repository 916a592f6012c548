"""Scale case: 20,000 genes x 5,000 patients over 5 sites, with a planted signal.

Generates, per site, a clinical CSV and an RNA-seq-like count matrix (Parquet, genes x
samples as expression matrices usually come, probes in a site-specific order), with a
site file that joins them on the patient id and applies ``cpm`` then ``log1p``. Then:

1. per site, in a fresh process (so its peak memory is its own): load the whole 20k-gene
   site through the data contract (read, transpose, transforms, join, split, encode,
   standardise), and train the study's logistic model on all 20,000 features for a fixed
   number of steps;
2. the federated study end to end (simulation, SecAgg+, federated selection of the 1,000
   most variable genes, federated standardisation), checking the planted genes are kept.

Records ``omics_20k_load_s`` (mean per-site load), ``omics_20k_peak_mb`` (largest per-site
peak resident memory, imports included), ``omics_20k_samples_per_s`` (training on all
20k features, one thread) and the federated run's figures in bench/results.json.
Run: ``.venv/bin/python bench/omics_scale.py [--genes 20000 --patients 5000 --sites 5]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing as mp
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.results import record  # noqa: E402

N_SIGNAL = 20  # planted genes: shifted up in patients with label 1
TOP_K = 1000


def gene_names(n: int) -> list[str]:
    return [f"G{i:05d}" for i in range(n)]


def generate(out: Path, genes: int, patients: int, sites: int, seed: int = 0) -> Path:
    """Write the sites' tables, site files and a study file under ``out``; returns the study file."""
    rng = np.random.default_rng(seed)
    names = np.array(gene_names(genes))
    base = rng.uniform(1.0, 6.0, genes).astype(np.float32)  # log-scale mean expression per gene
    spread = rng.uniform(0.3, 0.6, genes).astype(np.float32)  # log-scale noise per gene
    signal = rng.choice(genes, N_SIGNAL, replace=False)
    per_site = patients // sites
    site_refs = []
    for k in range(sites):
        name = f"site{k + 1}"
        pids = np.array([f"{name}-P{i:05d}" for i in range(per_site)])
        label = (rng.random(per_site) < 0.5).astype(np.int8)
        log_expr = base + spread * rng.standard_normal((per_site, genes), dtype=np.float32)
        log_expr[:, signal] += label[:, None].astype(np.float32)  # the planted signal
        depth = rng.uniform(0.5, 2.0, (per_site, 1)).astype(np.float32)  # library sizes differ
        counts = np.rint(np.exp(log_expr) * depth)
        order = rng.permutation(genes)  # every site lists its genes in its own order
        tall = pd.DataFrame(counts[:, order].T, columns=pids)
        tall.insert(0, "gene", names[order])
        tall.to_parquet(out / f"{name}_expression.parquet", index=False)
        pd.DataFrame({"patient": pids, "age": rng.normal(60, 9, per_site).round(1), "label": label}).to_csv(out / f"{name}_clinical.csv", index=False)
        (out / f"{name}.toml").write_text(
            f'[site]\nname = "{name}"\n\n[data]\nid = "patient"\nlabel = "label"\nnormalize = "federated"\n\n'
            f'[[tables]]\npath = "{name}_clinical.csv"\nrole = "clinical"\n\n'
            f'[[tables]]\npath = "{name}_expression.parquet"\nrole = "expression"\norientation = "genes_by_samples"\ntransforms = ["cpm", "log1p"]\n'
        )
        site_refs.append(f'[[sites]]\nname = "{name}"\nconfig = "{name}.toml"\n')
    (out / "study.toml").write_text(
        '[study]\nname = "omics-20k"\ntask = "binary"\nmodel = "logistic"\nrounds = 3\nstrategy = "fedavg"\n'
        "local_steps = 30\nbatch_size = 64\nlearning_rate = 0.05\nseed = 0\n\n"
        f"[omics]\ntop_k = {TOP_K}\nmax_missing_rate = 0.1\n\n" + "\n".join(site_refs)
    )
    (out / "signal.txt").write_text("\n".join(sorted(names[signal])) + "\n")
    return out / "study.toml"


def measure_site(site_path: str, steps: int, batch: int) -> dict[str, float]:
    """In a fresh process: load the site's whole matrix, train on every feature; timings and peak memory."""
    import torch

    from client.trainer import train
    from shared.config import load_site, load_study
    from shared.contract import load_site_data
    from shared.models import build_model
    from shared.plan import TrainingPlan

    torch.set_num_threads(1)  # as the ClientApp does
    site = load_site(site_path)
    started = time.perf_counter()
    data = load_site_data(dataclasses.replace(site, data=dataclasses.replace(site.data, normalize="site")), "binary")
    load_s = time.perf_counter() - started
    study = load_study(Path(site_path).parent / "study.toml")
    plan = dataclasses.replace(TrainingPlan.from_study(study, list(data.feature_names)), local_steps=steps, batch_size=batch)
    model = build_model(plan.model, plan.task, len(data.feature_names), plan.model_options, seed=0)
    train(model, data, dataclasses.replace(plan, local_steps=5), server_round=0)  # warm-up
    started = time.perf_counter()
    train(model, data, plan, server_round=1)
    train_s = time.perf_counter() - started
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"load_s": load_s, "samples_per_s": steps * batch / train_s, "peak_mb": peak_mb, "features": len(data.feature_names), "n": data.n_train + data.n_test}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--genes", type=int, default=20000)
    parser.add_argument("--patients", type=int, default=5000)
    parser.add_argument("--sites", type=int, default=5)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--out", type=Path, default=None, help="keep the generated files here (default: a temporary folder)")
    parser.add_argument("--no-federated", action="store_true", help="skip the end-to-end federated run")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        study_path = generate(out, args.genes, args.patients, args.sites)
        print(f"generated {args.genes} genes x {args.patients} patients over {args.sites} sites in {time.perf_counter() - started:.1f} s ({out})", flush=True)
        results = []
        spawn = mp.get_context("spawn")
        for k in range(args.sites):
            with spawn.Pool(1) as pool:  # a fresh process per site: its peak memory is its own
                r = pool.apply(measure_site, (str(out / f"site{k + 1}.toml"), args.steps, args.batch))
            results.append(r)
            print(f"site{k + 1}: {r['n']} patients x {r['features']} features, load {r['load_s']:.2f} s, peak {r['peak_mb']:.0f} MB, train {r['samples_per_s']:.0f} samples/s", flush=True)
        figures: dict[str, float | int | str] = {
            "omics_20k_load_s": round(float(np.mean([r["load_s"] for r in results])), 2),
            "omics_20k_peak_mb": round(float(max(r["peak_mb"] for r in results))),
            "omics_20k_samples_per_s": round(float(np.mean([r["samples_per_s"] for r in results]))),
            "omics_20k_shape": f"{args.genes} genes x {args.patients} patients, {args.sites} sites",
        }
        if not args.no_federated:
            import torch

            from server.simulate import simulate

            started = time.perf_counter()
            report = simulate(study_path, out / "run", progress=False)
            figures["omics_20k_federated_s"] = round(time.perf_counter() - started, 1)
            features = torch.load(out / "run" / "model.pt", weights_only=False)["features"]
            planted = (out / "signal.txt").read_text().split()
            kept = len(set(planted) & set(features))
            figures["omics_20k_federated_auc"] = round(report["final"]["mean"]["roc_auc"], 4)
            figures["omics_20k_planted_kept"] = f"{kept}/{len(planted)} of the top {TOP_K} selected"
            print(f"federated: {figures['omics_20k_federated_s']} s, mean AUC {figures['omics_20k_federated_auc']}, planted genes kept {kept}/{len(planted)}", flush=True)
        record(figures)
        print(figures)


if __name__ == "__main__":
    main()
