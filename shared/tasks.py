"""Losses and predictions per task, so training and evaluation agree everywhere."""

from __future__ import annotations

import torch
from torch.nn import functional as F


def cox_partial_nll(log_hazard: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Negative Cox partial log-likelihood with Breslow ties, averaged over events.

    ``target`` holds ``(time, event)`` per row. The risk set of a patient with an
    event at time t is everyone with time >= t (ties share the same risk set:
    Breslow). A batch without events has no partial likelihood and returns 0.
    """
    time, event = target[:, 0], target[:, 1]
    at_risk = time.unsqueeze(0) >= time.unsqueeze(1)  # row i: who is at risk at t_i
    masked = log_hazard.unsqueeze(0).expand_as(at_risk).masked_fill(~at_risk, float("-inf"))
    log_risk = torch.logsumexp(masked, dim=1)
    n_events = event.sum()
    if n_events == 0:
        return log_hazard.sum() * 0.0
    return -((log_hazard - log_risk) * event).sum() / n_events


def hazard_nll_per_patient(logits: torch.Tensor, target: torch.Tensor, cuts: torch.Tensor) -> torch.Tensor:
    """Per-patient negative log-likelihood of the discrete-time logistic hazard model.

    Interval k covers ``[cuts[k-1], cuts[k])``. A patient whose time falls in
    interval j survived intervals 0..j-1 (label 0 in each) and, if the event was
    observed, had it in interval j (label 1); a censored patient contributes
    nothing for interval j. The loss of a batch is a sum of these terms.
    """
    time, event = target[:, 0], target[:, 1]
    interval = torch.bucketize(time.contiguous(), cuts.contiguous(), right=True)  # j for each patient
    k = torch.arange(logits.shape[1], device=logits.device).unsqueeze(0)
    survived = k < interval.unsqueeze(1)
    died = (k == interval.unsqueeze(1)) & (event.unsqueeze(1) > 0)
    terms = F.binary_cross_entropy_with_logits(logits, died.to(logits.dtype), reduction="none")
    return (terms * (survived | died).to(logits.dtype)).sum(dim=1)


def masked_bce_per_sample(logits: torch.Tensor, target: torch.Tensor, pos_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Multi-task binary cross-entropy per molecule over its *known* labels (NaN = unknown).

    Each molecule's loss is the mean over the tasks it was measured on (0 when
    none), so it stays one per-row term, as per-molecule DP-SGD needs.
    """
    known = ~torch.isnan(target)
    terms = F.binary_cross_entropy_with_logits(logits, torch.where(known, target, torch.zeros_like(target)), reduction="none", pos_weight=pos_weight)
    count = known.sum(-1).clamp(min=1).to(logits.dtype)
    return (terms * known.to(logits.dtype)).sum(-1) / count


def per_sample_loss(task: str, model: str = "", time_bins: tuple[float, ...] = (), pos_weight: list[float] | None = None):
    """``loss(output, target) -> tensor of one loss per row``; ``None`` where the loss
    does not decompose per row (the Cox partial likelihood).

    ``pos_weight`` (binary, multitask: one weight, or one per task) scales the positive
    term of the cross-entropy, so a rare positive class is not learnt away; it stays a
    per-row loss, as DP-SGD's per-sample clipping needs.
    """
    weight = torch.tensor(pos_weight, dtype=torch.float32) if pos_weight else None
    if task == "binary":
        return lambda out, y: F.binary_cross_entropy_with_logits(out, y, reduction="none", pos_weight=weight)
    if task == "regression":
        return lambda out, y: F.mse_loss(out, y, reduction="none")
    if task == "multitask":
        return masked_bce_per_sample if weight is None else lambda out, y: masked_bce_per_sample(out, y, weight)
    if task == "survival" and model == "hazard":
        cuts = torch.tensor(time_bins, dtype=torch.float32)
        return lambda out, y: hazard_nll_per_patient(out, y, cuts)
    if task == "survival":
        return None
    raise ValueError(f"unknown task {task!r}")


def loss_for(task: str, model: str = "", time_bins: tuple[float, ...] = (), pos_weight: list[float] | None = None):
    """The training loss of a task and model, as ``loss(output, target) -> scalar``."""
    per_row = per_sample_loss(task, model, time_bins, pos_weight)
    if per_row is None:
        return cox_partial_nll
    return lambda out, y: per_row(out, y).mean()


def predict(task: str, output: torch.Tensor) -> torch.Tensor:
    """Turn raw model output into the score metrics use (probability, value, risk).

    A hazard model's logits share one linear score across intervals, so their
    mean orders patients by risk exactly as that score does.
    """
    if task in ("binary", "multitask"):
        return torch.sigmoid(output)
    return output.mean(dim=-1) if output.ndim == 2 else output
