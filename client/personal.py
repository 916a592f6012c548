"""Personalization at the site: a personal model beside the global one, whose own parameters never leave.

Study ``[personalization] method``:

* ``finetune``: at each evaluation, a copy of the global model takes ``steps`` optimiser
  steps on the site's train split; its test metrics are reported as ``personalized_*``.
* ``fedbn``: the MLP's BatchNorm layers (affine and running statistics) stay at the site;
  only the other tensors are averaged.
* ``ditto``: a personal model trained each round, after the global update, with the
  proximal term ``lambda/2 * ||w_personal - w_global||^2`` to the round's global model.
* ``fenda``: FENDA-FL, a site-local feature extractor beside the federated one,
  concatenated into a site-local head (:class:`shared.models.Fenda`).

What must persist between rounds (FedBN's norm layers, FENDA's local parts, Ditto's
personal model) lives in one owner-only file per run beside the site's audit log
(:class:`PersonalStore`): a deployed node may run each message in a fresh process, and a
file the site owns is the one place both a simulation and a node keep. Under DP these
methods are refused when the study is parsed: personal training would read the private
rows outside the steps the ledger accounts.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import os
from pathlib import Path

import torch
from torch import nn

from client.trainer import _optimizer, batches, derived_seed, evaluate, train
from shared.contract import SiteData
from shared.errors import ConfigError
from shared.metrics import BASELINE, INTERVAL_PREFIXES, withhold_small_sample
from shared.models import personal_keys
from shared.plan import TrainingPlan
from shared.tasks import loss_for

PREFIX = "personalized_"


class PersonalStore:
    """One run's personal tensors at one site: ``SITE.personal/<run digest>.pt``, owner-only (0600)."""

    def __init__(self, audit_log: Path, site: str, run: str) -> None:
        digest = hashlib.sha256(f"{site}|{run}".encode()).hexdigest()[:24]
        self.path = Path(audit_log).parent / f"{site}.personal" / f"{digest}.pt"

    def load(self) -> dict[str, torch.Tensor] | None:
        if not self.path.exists():
            return None
        return torch.load(self.path, weights_only=True)

    def save(self, state: dict[str, torch.Tensor]) -> None:
        """Written to a temporary file and renamed: a crash leaves the previous round's state."""
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            torch.save({k: v.detach().clone() for k, v in state.items()}, fh)
        os.replace(tmp, self.path)


def check_private(plan: TrainingPlan) -> None:
    """Personal training outside DP-SGD is not accounted: refused (a parsed study never gets here with DP)."""
    if plan.personalization is not None and plan.privacy.dp:
        raise ConfigError(f"study '{plan.study}': [personalization] is not available with DP (personal training would not be accounted)")


def restore_local(model: nn.Module, store: PersonalStore) -> None:
    """FedBN/FENDA: put the site's own tensors back into a model that holds the new global ones."""
    state = store.load()
    if state:
        model.load_state_dict({k: state[k] for k in personal_keys(model)}, strict=False)


def keep_local(model: nn.Module, store: PersonalStore) -> None:
    full = model.state_dict()
    store.save({k: full[k] for k in personal_keys(model)})


def fit_personal(plan: TrainingPlan, data, model: nn.Module, store: PersonalStore, server_round: int) -> dict[str, float]:
    """One round of training with the study's method; the model keeps the global update, the store the personal part.

    ``model`` holds the round's global weights on entry (and, for FedBN/FENDA, the
    initial values of the personal tensors, replaced here by the site's own).
    """
    method = plan.personal_method
    if method == "fenda":
        restore_local(model, store)
        metrics = train_fenda(model, data, plan, server_round)
        keep_local(model, store)
        return metrics
    if method == "fedbn":
        restore_local(model, store)
        metrics = train(model, data, plan, server_round)
        keep_local(model, store)
        return metrics
    if method != "ditto":  # finetune trains as usual; its personal model is made at evaluation
        return train(model, data, plan, server_round)
    anchor = [p.detach().clone() for p in model.parameters()]  # the round's global model w_g
    personal = copy.deepcopy(model)
    state = store.load()
    if state:
        personal.load_state_dict(state)
    metrics = train(model, data, plan, server_round)
    ditto = dataclasses.replace(plan, proximal_mu=plan.personalization.lam)
    personal_loss = train(personal, data, ditto, server_round, anchor=anchor).get("train_loss")
    store.save(personal.state_dict())
    return metrics | ({f"{PREFIX}train_loss": personal_loss} if personal_loss is not None else {})


def train_fenda(model: nn.Module, data: SiteData, plan: TrainingPlan, server_round: int) -> dict[str, float]:
    """FENDA-FL steps: the personal head's loss trains both extractors; the global head's trains the global model."""
    if not isinstance(data, SiteData):
        raise ConfigError("[personalization] method 'fenda' applies to tabular studies (model = \"mlp\")")
    torch.manual_seed(derived_seed(plan.seed, data.site, server_round, "init"))
    generator = torch.Generator().manual_seed(derived_seed(plan.seed, data.site, server_round))
    x, y = torch.from_numpy(data.x_train), torch.from_numpy(data.y_train)
    loss_fn = loss_for(plan.task, plan.model, plan.model_options.time_bins)
    optimizer = _optimizer(model, plan)
    model.train()
    total = 0.0
    for idx in batches(len(x), plan.batch_size, plan.local_steps, generator):
        optimizer.zero_grad()
        loss = loss_fn(model.personal(x[idx]), y[idx]) + loss_fn(model(x[idx]), y[idx])
        loss.backward()
        optimizer.step()
        total += float(loss.detach())
    return {"train_loss": total / max(plan.local_steps, 1)}


class _PersonalView(nn.Module):
    """A FENDA model read through its personal head (shares the parameters)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.personal(x)


def global_view(plan: TrainingPlan, data, model: nn.Module) -> nn.Module:
    """The model the site's *global* metrics describe.

    FedBN has no global normalisation layers: the global metrics are those of the shared
    weights with BatchNorm statistics estimated on this site's train split (affine at its
    initial identity), i.e. what the global model gives a site without training.
    """
    if plan.personal_method != "fedbn":
        return model
    reference = copy.deepcopy(model)
    for layer in reference.modules():
        if isinstance(layer, nn.BatchNorm1d):
            layer.reset_parameters()
            layer.momentum = None  # a cumulative average over one pass
    reference.train()
    with torch.no_grad():
        reference(torch.from_numpy(data.x_train))
    return reference


def personal_model(plan: TrainingPlan, data, model: nn.Module, store: PersonalStore, server_round: int) -> nn.Module | None:
    """The site's personal model at evaluation, or None before it has one (Ditto, FedBN and FENDA before round 1)."""
    method = plan.personal_method
    if method == "finetune":
        tuned = copy.deepcopy(model)
        steps = dataclasses.replace(plan, local_steps=plan.personalization.steps, proximal_mu=0.0)
        train(tuned, data, steps, server_round)
        return tuned
    state = store.load()
    if not state:
        return None
    personal = copy.deepcopy(model)
    personal.load_state_dict(state, strict=method == "ditto")
    return _PersonalView(personal) if method == "fenda" else personal


def personalized_metrics(plan: TrainingPlan, data, model: nn.Module, store: PersonalStore, server_round: int) -> dict[str, float | None]:
    """``personalized_<metric>`` (and ``personalized_loss``) of the site's personal model on its test split."""
    personal = personal_model(plan, data, model, store, server_round)
    if personal is None:
        return {}
    loss, metrics = evaluate(personal, data, plan)
    own = {k: v for k, v in {"loss": loss, **metrics}.items() if not k.startswith((BASELINE, *INTERVAL_PREFIXES))}
    released = withhold_small_sample(own, data.n_test)
    return {f"{PREFIX}{k}": v for k, v in released.items()}
