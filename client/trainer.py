"""Local training and evaluation of the global model on one site's data."""

from __future__ import annotations

import hashlib

import numpy as np
import torch
from torch import nn

from shared.contract import SiteData
from shared.metrics import task_metrics
from shared.plan import TrainingPlan
from shared.tasks import loss_for, predict


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


def train(model: nn.Module, data: SiteData, plan: TrainingPlan, server_round: int) -> dict[str, float]:
    """Run ``plan.local_steps`` optimiser steps from the current (global) weights.

    FedProx adds ``mu/2 * ||w - w_global||^2`` to the loss. Shuffling is seeded
    from (study seed, site, round), so a rerun of a study is reproducible.
    """
    torch.manual_seed(derived_seed(plan.seed, data.site, server_round, "init"))
    generator = torch.Generator().manual_seed(derived_seed(plan.seed, data.site, server_round))
    x = torch.from_numpy(data.x_train)
    y = torch.from_numpy(data.y_train)
    loss_fn = loss_for(plan.task)
    if plan.optimizer == "adam":
        optimizer: torch.optim.Optimizer = torch.optim.Adam(model.parameters(), lr=plan.learning_rate)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=plan.learning_rate)
    global_params = [p.detach().clone() for p in model.parameters()] if plan.proximal_mu > 0 else None
    model.train()
    total, count = 0.0, 0
    for idx in batches(len(x), plan.batch_size, plan.local_steps, generator):
        optimizer.zero_grad()
        loss = loss_fn(model(x[idx]), y[idx])
        if global_params is not None:
            prox = sum(((p - g) ** 2).sum() for p, g in zip(model.parameters(), global_params))
            loss = loss + 0.5 * plan.proximal_mu * prox
        loss.backward()
        optimizer.step()
        total += float(loss.detach())
        count += 1
    return {"train_loss": total / max(count, 1)}


@torch.no_grad()
def evaluate(model: nn.Module, data: SiteData, task: str, split: str = "test") -> tuple[float, dict[str, float | None]]:
    """Loss and task metrics of ``model`` on the site's ``split``."""
    x, y = (data.x_test, data.y_test) if split == "test" else (data.x_train, data.y_train)
    model.eval()
    output = model(torch.from_numpy(x))
    loss = float(loss_for(task)(output, torch.from_numpy(y)))
    score = predict(task, output).numpy().astype(np.float64)
    return loss, task_metrics(task, y, score)
