"""Local training and evaluation of the molecule GNN; under DP, one molecule is one privacy unit.

Plain training runs PyG's sparse mini-batches. DP-SGD needs one gradient per
*molecule*: Opacus would take the atoms inside a message-passing layer for the
batch (clipping per atom, or failing on unequal sizes; opacus #588, #841).
Every parameter of the GNN sits in a Linear layer, so a molecule's gradient of
a layer is the sum over its atoms of (output gradient) x (input) outer products:
:func:`client.privacy.dpsgd.noisy_step` takes its Linear fast path on the same
sparse batches as plain training, with PyG's ``batch`` vector naming each atom's
molecule. Per-molecule norms come from the atoms padded per molecule (no
per-molecule gradient tensors), the clipped sum from one more product per layer,
then noise like any other model's. Molecules above ``max_atoms`` (a public cap)
sit out. A model with parameters outside Linear layers would fall back to dense
padded graphs and ``torch.func.vmap(grad(...))``.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch import nn
from torch_geometric.nn.dense.linear import Linear as PyGLinear

from client.privacy.budget import DPRound
from client.privacy.dpsgd import linear_layers, noisy_step, poisson_batch
from client.privacy.randomness import SecureRandom
from client.trainer import _optimizer, derived_seed, dp_random, plain_steps, reference_metrics
from shared.errors import ConfigError
from shared.gnn import DenseBatch, DenseView, MoleculeGNN, dense_batch, sparse_batch
from shared.metrics import multitask_metrics, task_metrics
from shared.molecule_data import MoleculeData
from shared.molecules import ATOM_FEATURES
from shared.plan import TrainingPlan
from shared.tasks import loss_for, per_sample_loss, predict

log = logging.getLogger("fedhelix.client")


def train_graphs(model: MoleculeGNN, data: MoleculeData, plan: TrainingPlan, server_round: int, dp: DPRound | None = None, anchor: list[torch.Tensor] | None = None) -> dict[str, float]:
    """``plan.local_steps`` optimiser steps on the site's molecules from the global weights."""
    torch.manual_seed(derived_seed(plan.seed, data.site, server_round, "init"))
    generator = torch.Generator().manual_seed(derived_seed(plan.seed, data.site, server_round))
    graphs = data.graphs_train
    y = torch.from_numpy(np.asarray(data.y_train, dtype=np.float32))
    optimizer = _optimizer(model, plan)
    if dp is not None:
        sampler = dp_random(plan, data.site, server_round, "poisson")
        noise = dp_random(plan, data.site, server_round, "noise")
        return _train_graphs_dp(model, data, y, plan, dp, optimizer, sampler, noise)
    forward = lambda idx: model(*sparse_batch([graphs[i] for i in idx.tolist()]))  # noqa: E731
    return plain_steps(model, len(graphs), forward, y, loss_for(plan.task, pos_weight=plan.pos_weight), plan, optimizer, generator, anchor)


def molecule_layers(model: MoleculeGNN) -> list[nn.Module] | None:
    """The GNN's Linear layers (``nn.Linear`` and PyG's inside ``GraphConv``), or ``None`` for vmap."""
    return linear_layers(model, (nn.Linear, PyGLinear))


def molecule_dp_step(
    model: MoleculeGNN, layers: list[nn.Module] | None, optimizer, loss_fn, graphs: list, y: torch.Tensor,
    *, max_grad_norm: float, noise_multiplier: float, expected_batch_size: float, noise: SecureRandom, max_atoms: int,
) -> None:  # fmt: skip
    """One DP-SGD step on a Poisson-sampled list of molecules, each molecule one privacy unit."""
    dp = dict(max_grad_norm=max_grad_norm, noise_multiplier=noise_multiplier, expected_batch_size=expected_batch_size, noise=noise)
    if layers is None:  # generic route: dense padded graphs, per-molecule vmap(grad)
        inputs = dense_batch(graphs, max_atoms) if graphs else _empty_dense()
        noisy_step(DenseView(model), optimizer, loss_fn, inputs, y, layers=None, **dp)
        return
    batch = sparse_batch(graphs)
    noisy_step(model, optimizer, loss_fn, batch, y, layers=layers, row_samples=atom_rows(model, layers, batch[2]), **dp)


def atom_rows(model: MoleculeGNN, layers: list[nn.Module], batch: torch.Tensor) -> dict[nn.Module, torch.Tensor]:
    """Every layer but the readout sees atoms: PyG's ``batch`` vector names each atom's molecule."""
    return {layer: batch for layer in layers if layer is not model.out}


def _empty_dense() -> DenseBatch:
    return torch.zeros(0, 1, len(ATOM_FEATURES)), torch.zeros(0, 1, 1), torch.zeros(0, 1, dtype=torch.bool)


def _train_graphs_dp(model, data: MoleculeData, y, plan: TrainingPlan, dp: DPRound, optimizer, sampler: SecureRandom, noise: SecureRandom) -> dict[str, float]:
    if plan.proximal_mu > 0:
        raise ConfigError("FedProx's proximal term is not supported under DP-SGD")
    cap = plan.model_options.max_atoms
    # Molecules above the public size cap never take part (each is judged alone, so this is per-record).
    eligible = [i for i, g in enumerate(data.graphs_train) if g.num_nodes <= cap]
    if len(eligible) < data.n_train:
        log.warning("site '%s': %d molecule(s) above max_atoms = %d are left out of DP training", data.site, data.n_train - len(eligible), cap)
    graphs = [data.graphs_train[i] for i in eligible]
    y = y[torch.tensor(eligible, dtype=torch.long)]
    layers = molecule_layers(model)
    loss_fn = per_sample_loss(plan.task, pos_weight=plan.pos_weight)
    expected = dp.sample_rate * len(graphs)
    model.train()
    for _ in range(dp.steps):
        idx = poisson_batch(len(graphs), dp.sample_rate, sampler)
        molecule_dp_step(
            model, layers, optimizer, loss_fn, [graphs[i] for i in idx.tolist()], y[idx],
            max_grad_norm=dp.max_grad_norm, noise_multiplier=dp.noise_multiplier,
            expected_batch_size=expected, noise=noise, max_atoms=cap,
        )  # fmt: skip
    return {}  # no train loss under DP (an un-noised statistic of private rows)


@torch.no_grad()
def evaluate_graphs(model: MoleculeGNN, data: MoleculeData, plan: TrainingPlan, split: str = "test") -> tuple[float, dict[str, float | None]]:
    """Loss and task metrics (per-task ROC/PR AUC for multitask) on the site's ``split``, with their references on the test split."""
    graphs, y = (data.graphs_test, data.y_test) if split in ("test", "validation") else (data.graphs_train, data.y_train)
    model.eval()
    output = model(*sparse_batch(graphs))
    target = torch.from_numpy(np.asarray(y, dtype=np.float32))
    loss = float(loss_for(plan.task)(output, target))
    score = predict(plan.task, output).numpy().astype(np.float64)
    names = list(data.labels) if plan.task == "multitask" else None
    metrics = multitask_metrics(y, score, names) if plan.task == "multitask" else task_metrics(plan.task, y, score)
    if split == "test":
        metrics |= reference_metrics(plan, data.site, data.y_train, y, score, names)
    return loss, metrics
