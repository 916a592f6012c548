"""Step time of DP-SGD versus plain SGD on the same model and data, measured side by side.

Models: the MLP 200-256-128-1 on 100k x 200 synthetic rows (batch 256), and the
TCGA-BRCA DP model (discrete-time hazard, 39 features, batch 8), and the molecule
GNN (3 GraphConv layers of 64, ESOL molecules, batch 32). The GNN comparison is what
``client/graph_trainer.py`` really runs: a plain step builds a PyG sparse batch of 32
molecules and takes an ordinary step; a DP step Poisson-samples (expected 32), builds
the same kind of sparse batch and takes ``molecule_dp_step`` (per-molecule clipping on
the Linear fast path, noise); batch building is timed on both sides, the one-off
featurisation of the SMILES on neither. The tabular DP steps use
fedhelix's Linear fast path (per-sample clipping without per-sample gradient
tensors) with Poisson sampling and Gaussian noise; Opacus's own ghost clipping
is timed on the MLP for reference. Each variant is timed in alternation, best
of several repeats. DP noise and batches come from ``SecureRandom`` (ChaCha20), as
in training; the MLP run also times that noise draw alone against ``torch.randn``
(``dp_noise_draw_us``). Writes ``dp_overhead_mlp``, ``dp_overhead_tcga`` and
``dp_overhead_gnn`` (DP time / non-DP time per step) to bench/results.json (or ``--results``).
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.results import RESULTS, record  # noqa: E402
from client.privacy.dpsgd import noisy_step, poisson_batch  # noqa: E402
from client.privacy.randomness import SecureRandom  # noqa: E402
from shared.config import ModelOptions  # noqa: E402
from shared.models import MLP, build_model  # noqa: E402
from shared.tasks import per_sample_loss  # noqa: E402


def _time(fn, steps: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - start) / steps


def side_by_side(model, loss_fn, x, y, batch: int, steps: int, repeats: int) -> tuple[float, float]:
    """Best-of-``repeats`` seconds per step for (plain SGD, DP-SGD) on the same model and data."""
    n = len(x)
    q = batch / n
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    picker, sampler, noise = np.random.default_rng(0), SecureRandom.from_os(), SecureRandom.from_os()

    def plain():
        idx = torch.from_numpy(picker.integers(0, n, batch))
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x[idx]), y[idx]).mean().backward()
        opt.step()

    def private():
        idx = poisson_batch(n, q, sampler)
        noisy_step(model, opt, loss_fn, x[idx], y[idx], max_grad_norm=1.0, noise_multiplier=1.0, expected_batch_size=q * n, noise=noise)

    best_plain, best_dp = float("inf"), float("inf")
    for _ in range(repeats):
        best_plain = min(best_plain, _time(plain, steps))
        best_dp = min(best_dp, _time(private, steps))
    return best_plain, best_dp


def opacus_ghost(x, y, batch: int, steps: int) -> float:
    """Seconds per step of Opacus 1.6 ghost clipping on the MLP (reference only)."""
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    model = MLP(x.shape[1], (256, 128))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    loader = DataLoader(TensorDataset(x, y), batch_size=batch)
    engine = PrivacyEngine(accountant="rdp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, opt, criterion, loader = engine.make_private(
            module=model, optimizer=opt, data_loader=loader, criterion=torch.nn.BCEWithLogitsLoss(),
            noise_multiplier=1.0, max_grad_norm=1.0, grad_sample_mode="ghost", poisson_sampling=True,
        )  # fmt: skip
    it = iter(loader)

    def step():
        nonlocal it
        try:
            xb, yb = next(it)
        except StopIteration:
            it = iter(loader)
            xb, yb = next(it)
        opt.zero_grad()
        criterion(model(xb), yb).backward()
        opt.step()

    return _time(step, steps)


def gnn_side_by_side(steps: int, repeats: int, batch: int = 32) -> tuple[list[float], list[float]]:
    """Seconds per step of each alternating repeat for the molecule GNN: (plain, DP), both on PyG sparse batches."""
    import pandas as pd

    from client.graph_trainer import molecule_dp_step, molecule_layers
    from shared.gnn import sparse_batch
    from shared.molecules import ATOM_FEATURES, featurise

    frame = pd.read_csv(Path(__file__).resolve().parent.parent / "data" / "molecules" / "ESOL_delaney-processed.csv")
    graphs = [g for g in featurise(frame["smiles"].tolist())[0] if g is not None]
    y = torch.randn(len(graphs))
    model = build_model("gnn", "regression", len(ATOM_FEATURES), ModelOptions(hidden=(64,), layers=3, conv="graphconv", pooling="add"), seed=0)
    loss_fn = per_sample_loss("regression")
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    n, q = len(graphs), batch / len(graphs)
    picker, sampler, noise, layers = np.random.default_rng(0), SecureRandom.from_os(), SecureRandom.from_os(), molecule_layers(model)

    def plain():
        idx = picker.integers(0, n, batch).tolist()
        opt.zero_grad(set_to_none=True)
        loss_fn(model(*sparse_batch([graphs[i] for i in idx])), y[idx]).mean().backward()
        opt.step()

    def private():
        idx = poisson_batch(n, q, sampler)
        molecule_dp_step(
            model, layers, opt, loss_fn, [graphs[i] for i in idx.tolist()], y[idx],
            max_grad_norm=1.0, noise_multiplier=1.0, expected_batch_size=q * n, noise=noise, max_atoms=128,
        )  # fmt: skip

    plains, dps = [], []
    for _ in range(repeats):
        plains.append(_time(plain, steps))
        dps.append(_time(private, steps))
    return plains, dps


def randomness_draws(n_params: int, n_rows: int, q: float, steps: int, repeats: int) -> dict[str, float]:
    """Best-of-``repeats`` microseconds per draw: one step's noise (SecureRandom vs torch.randn) and batch (vs NumPy)."""
    secure, gen, rng = SecureRandom.from_os(), torch.Generator().manual_seed(1), np.random.default_rng(0)
    draws = {
        "secure_normal": lambda: secure.normal(n_params),
        "torch_randn": lambda: torch.randn(n_params, generator=gen),
        "secure_poisson": lambda: secure.poisson_indices(n_rows, q),
        "numpy_poisson": lambda: torch.from_numpy(rng.choice(n_rows, size=int(rng.binomial(n_rows, q)), replace=False)),
    }
    best = dict.fromkeys(draws, float("inf"))
    for _ in range(repeats):
        for name, fn in draws.items():
            best[name] = min(best[name], _time(fn, steps) * 1e6)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--models", nargs="+", default=["mlp", "tcga", "gnn"], choices=["mlp", "tcga", "gnn"])
    parser.add_argument("--results", type=Path, default=RESULTS, help="JSON file the figures are merged into")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    figures: dict[str, float] = {}
    if "gnn" in args.models:
        plains, dps = gnn_side_by_side(max(10, args.steps // 3), args.repeats)
        g_plain, g_dp = min(plains), min(dps)
        ratios = sorted(d / p for p, d in zip(plains, dps))  # each DP repeat against the plain one just before it
        print(
            f"molecule GNN (3 x GraphConv 64, ESOL, batch 32; both sides: sampling + PyG sparse batch + step): plain {g_plain * 1e3:.1f} ms/step, "
            f"DP {g_dp * 1e3:.1f} ms/step -> {g_dp / g_plain:.2f}x (best of {len(plains)}); plain {np.median(plains) * 1e3:.1f}-{max(plains) * 1e3:.1f}, "
            f"DP {np.median(dps) * 1e3:.1f}-{max(dps) * 1e3:.1f} ms median-max; per-repeat ratio {ratios[0]:.2f}/{np.median(ratios):.2f}/{ratios[-1]:.2f} min/median/max"
        )  # fmt: skip
        figures.update(
            dp_overhead_gnn=round(g_dp / g_plain, 3), dp_overhead_gnn_median_ratio=round(float(np.median(ratios)), 3),
            gnn_plain_ms_per_step=round(g_plain * 1e3, 2), gnn_dp_ms_per_step=round(g_dp * 1e3, 2),
        )  # fmt: skip
    if "mlp" in args.models:
        figures.update(mlp_figures(args.steps, args.repeats))
    if "tcga" in args.models:
        figures.update(tcga_figures(args.steps, args.repeats))
    record(figures, args.results)


def mlp_figures(steps: int, repeats: int) -> dict[str, float]:
    """The MLP's DP/plain step ratio, Opacus ghost for reference, and the cost of its noise draw."""
    x = torch.randn(100_000, 200)
    y = (x[:, :5].sum(1) + 0.5 * torch.randn(100_000) > 0).float()
    mlp = MLP(200, (256, 128))
    plain, dp = side_by_side(mlp, per_sample_loss("binary"), x, y, batch=256, steps=steps, repeats=repeats)
    ghost = opacus_ghost(x, y, 256, max(20, steps // 2))
    print(f"MLP 200-256-128-1, batch 256: plain {256 / plain:,.0f} samples/s, DP {256 / dp:,.0f} samples/s -> DP/plain {dp / plain:.2f}x")
    print(f"  Opacus ghost clipping on the same MLP: {256 / ghost:,.0f} samples/s -> {ghost / plain:.2f}x plain")
    n_params = sum(p.numel() for p in mlp.parameters())
    d = randomness_draws(n_params, len(x), 256 / len(x), steps, repeats)
    print(
        f"  noise for {n_params:,} parameters: SecureRandom (ChaCha20) {d['secure_normal']:.0f} us vs torch.randn {d['torch_randn']:.0f} us "
        f"= {d['secure_normal'] / (dp * 1e6):.1%} vs {d['torch_randn'] / (dp * 1e6):.1%} of a DP step ({dp * 1e6:.0f} us); "
        f"Poisson batch of {len(x):,} rows: {d['secure_poisson']:.0f} us vs NumPy {d['numpy_poisson']:.0f} us; "
        f"net cost of the secure source {(d['secure_normal'] + d['secure_poisson'] - d['torch_randn'] - d['numpy_poisson']) / (dp * 1e6):+.1%} of a DP step"
    )  # fmt: skip
    return {
        "dp_overhead_mlp": round(dp / plain, 3),
        "dp_overhead_mlp_opacus_ghost": round(ghost / plain, 3),
        "mlp_plain_samples_per_s": round(256 / plain),
        "mlp_dp_samples_per_s": round(256 / dp),
        "dp_noise_draw_us": round(d["secure_normal"], 1),
    }


def tcga_figures(steps: int, repeats: int) -> dict[str, float]:
    """The TCGA hazard model's DP/plain step ratio."""
    bins = (365.0, 730.0, 1095.0, 1460.0, 1825.0, 2555.0, 3650.0)
    xt = torch.randn(1000, 39)
    yt = torch.stack([torch.rand(1000) * 4000, (torch.rand(1000) < 0.14).float()], 1)
    hazard = build_model("hazard", "survival", 39, ModelOptions(time_bins=bins))
    t_plain, t_dp = side_by_side(hazard, per_sample_loss("survival", "hazard", bins), xt, yt, batch=8, steps=steps * 5, repeats=repeats)
    print(f"TCGA hazard model (39 -> 8 intervals), batch 8: plain {t_plain * 1e6:.0f} us/step, DP {t_dp * 1e6:.0f} us/step -> {t_dp / t_plain:.2f}x")
    return {"dp_overhead_tcga": round(t_dp / t_plain, 3)}


if __name__ == "__main__":
    main()
