"""Local training and evaluation of the global model on one site's data."""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from client.privacy.budget import DPRound
from client.privacy.dpsgd import linear_layers, noisy_step, poisson_batch
from client.privacy.randomness import SecureRandom
from shared.contract import SiteData
from shared.errors import ConfigError
from shared.metrics import MIN_TEST_FOR_COUNTS, PRIMARY, baseline_metrics, bootstrap_interval, interval_metrics, task_metrics
from shared.plan import TrainingPlan
from shared.tasks import loss_for, per_sample_loss, predict


def derived_seed(*parts: object) -> int:
    """A stable 63-bit seed from any parts (Python's ``hash`` is salted per process)."""
    digest = hashlib.sha256("|".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def batches(n: int, batch_size: int, steps: int, generator: torch.Generator):
    """Yield ``steps`` index batches, reshuffling at the end of every pass over the data."""
    batch_size = min(batch_size, n)
    order, pos = torch.randperm(n, generator=generator), 0
    for _ in range(steps):
        if pos + batch_size > n:
            order, pos = torch.randperm(n, generator=generator), 0
        yield order[pos : pos + batch_size]
        pos += batch_size


def _optimizer(model: nn.Module, plan: TrainingPlan) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if plan.optimizer == "adam":
        return torch.optim.Adam(params, lr=plan.learning_rate)
    return torch.optim.SGD(params, lr=plan.learning_rate)


def dp_random(plan: TrainingPlan, site: str, server_round: int, purpose: str) -> SecureRandom:
    """Source of the DP noise or Poisson batches: a fresh 256-bit OS key, or the study seed when a simulation asks.

    A ChaCha20 keystream keyed from ``os.urandom`` cannot be predicted or searched
    by the coordinator (a torch generator keeps only 32 bits of its seed), and a new
    key per round and purpose keeps draws distinct across rounds and forked processes.
    ``reproducible_noise`` (refused on a real node) derives the key from
    (study seed, site, round, purpose) so a simulation reruns exactly.
    """
    if plan.privacy.reproducible_noise:
        return SecureRandom.from_seed(plan.seed, site, server_round, purpose)
    return SecureRandom.from_os()


def scaled_steps(plan: TrainingPlan, n_train: int) -> TrainingPlan:
    """With ``local_epochs``, the plan whose ``local_steps`` cover that many passes over this site's train split.

    A large site then does proportionally more local work than a small one, as in
    centralised training, instead of one fixed step count that under-trains it.
    """
    if not plan.local_epochs:
        return plan
    return dataclasses.replace(plan, local_steps=max(1, math.ceil(plan.local_epochs * n_train / plan.batch_size)))


def train(model: nn.Module, data: SiteData, plan: TrainingPlan, server_round: int, dp: DPRound | None = None, anchor: list[torch.Tensor] | None = None) -> dict[str, float]:
    """Run ``plan.local_steps`` optimiser steps (or ``local_epochs`` passes) from the current (global) weights.

    FedProx adds ``mu/2 * ||w - w_global||^2`` to the loss (Ditto's personal model:
    ``w_global`` is the ``anchor``, not the starting weights). Shuffling is seeded
    from (study seed, site, round), so a rerun of a study is reproducible.
    With ``dp``, each step is a DP-SGD step on a Poisson-sampled batch.
    """
    plan = scaled_steps(plan, data.n_train) if dp is None else plan  # the study refuses local_epochs under DP
    if not isinstance(data, SiteData):  # molecules: graphs, per-molecule DP
        from client.graph_trainer import train_graphs

        return train_graphs(model, data, plan, server_round, dp, anchor)
    torch.manual_seed(derived_seed(plan.seed, data.site, server_round, "init"))
    generator = torch.Generator().manual_seed(derived_seed(plan.seed, data.site, server_round))
    x = torch.from_numpy(data.x_train)
    y = torch.from_numpy(data.y_train)
    optimizer = _optimizer(model, plan)
    if dp is not None:
        # Secret batch selection: privacy amplification by sampling assumes the server cannot predict it.
        sampler = dp_random(plan, data.site, server_round, "poisson")
        noise = dp_random(plan, data.site, server_round, "noise")
        return _train_dp(model, x, y, plan, dp, optimizer, sampler, noise)
    loss_fn = loss_for(plan.task, plan.model, plan.model_options.time_bins, plan.pos_weight)
    return plain_steps(model, len(x), lambda idx: model(x[idx]), y, loss_fn, plan, optimizer, generator, anchor)


def plain_steps(
    model, n_rows: int, forward: Callable[[torch.Tensor], torch.Tensor], y, loss_fn, plan: TrainingPlan, optimizer, generator: torch.Generator,
    anchor: list[torch.Tensor] | None = None,
) -> dict[str, float]:  # fmt: skip
    """``plan.local_steps`` ordinary optimiser steps; ``forward(idx)`` is the model's output for those rows.

    Shared by tabular and molecule training; FedProx adds its proximal term here.
    """
    global_params = None
    if plan.proximal_mu > 0:
        global_params = [p.detach().clone() for p in (model.parameters() if anchor is None else anchor)]
    model.train()
    total, count = 0.0, 0
    for idx in batches(n_rows, plan.batch_size, plan.local_steps, generator):
        optimizer.zero_grad()
        loss = loss_fn(forward(idx), y[idx])
        if global_params is not None:
            prox = sum(((p - g) ** 2).sum() for p, g in zip(model.parameters(), global_params))
            loss = loss + 0.5 * plan.proximal_mu * prox
        loss.backward()
        optimizer.step()
        total += float(loss.detach())
        count += 1
    return {"train_loss": total / max(count, 1)}


def _train_dp(model, x, y, plan: TrainingPlan, dp: DPRound, optimizer, sampler: SecureRandom, noise: SecureRandom) -> dict[str, float]:
    loss_fn = per_sample_loss(plan.task, plan.model, plan.model_options.time_bins, plan.pos_weight)
    if loss_fn is None:
        raise ConfigError(f"model {plan.model!r} has no per-sample loss; it cannot be trained under DP")
    if plan.proximal_mu > 0:
        raise ConfigError("FedProx's proximal term is not supported under DP-SGD")
    model.train()
    expected = dp.sample_rate * len(x)
    layers = linear_layers(model)
    for _ in range(dp.steps):
        idx = poisson_batch(len(x), dp.sample_rate, sampler)
        noisy_step(
            model, optimizer, loss_fn, x[idx], y[idx],
            max_grad_norm=dp.max_grad_norm, noise_multiplier=dp.noise_multiplier,
            expected_batch_size=expected, noise=noise, layers=layers,
        )  # fmt: skip
    # No train loss under DP: an un-noised statistic of the private rows would leak outside epsilon.
    return {}


@torch.no_grad()
def evaluate(model: nn.Module, data: SiteData, plan: TrainingPlan, split: str = "test") -> tuple[float, dict[str, float | None]]:
    """Loss and task metrics of ``model`` on the site's ``split`` (on the test split, with their references).

    ``split = "validation"`` scores the test arrays of a carved validation view
    (:func:`shared.validation.carve_validation`), without references.
    """
    if not isinstance(data, SiteData):
        from client.graph_trainer import evaluate_graphs

        return evaluate_graphs(model, data, plan, split)
    task = plan.task
    x, y = (data.x_test, data.y_test) if split in ("test", "validation") else (data.x_train, data.y_train)
    model.eval()
    output = model(torch.from_numpy(x))
    loss = float(loss_for(task, plan.model, plan.model_options.time_bins)(output, torch.from_numpy(y)))
    score = predict(task, output).numpy().astype(np.float64)
    metrics = task_metrics(task, y, score)
    if split == "test":
        metrics |= reference_metrics(plan, data.site, data.y_train, y, score)
    return loss, metrics


def validation_metrics(model: nn.Module, validation, plan: TrainingPlan) -> dict[str, float | None]:
    """What best-round selection needs: the primary metric and loss on the validation rows, and their number.

    The loss is withheld on fewer than ``MIN_TEST_FOR_COUNTS`` rows, as on a small test split.
    """
    loss, metrics = evaluate(model, validation, plan, split="validation")
    primary = PRIMARY[plan.task][0]
    n = validation.n_test
    return {"val_" + primary: metrics.get(primary), "val_loss": loss if n >= MIN_TEST_FOR_COUNTS else None, "n_val": n}


def reference_metrics(plan: TrainingPlan, site: str, y_train: np.ndarray, y_test: np.ndarray, score: np.ndarray, names: list[str] | None = None) -> dict[str, float | None]:
    """What the model must beat and how sure its score is: the constant predictor's metrics and a bootstrap interval.

    The constant is fit on the training labels; under DP their mean would leave the site
    outside epsilon, so it is fit on the test labels instead (the best constant there: a
    stricter reference). The interval's resamples are seeded from (study seed, site), so
    a rerun reports the same interval.
    """
    reference = y_test if plan.privacy.dp else y_train
    interval = bootstrap_interval(plan.task, y_test, score, seed=derived_seed(plan.seed, site, "bootstrap"))
    return baseline_metrics(plan.task, reference, y_test, names) | interval_metrics(plan.task, interval)
