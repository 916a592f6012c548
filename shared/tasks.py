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


def loss_for(task: str):
    """The training loss of a task, as ``loss(output, target) -> scalar``."""
    if task == "binary":
        return F.binary_cross_entropy_with_logits
    if task == "regression":
        return F.mse_loss
    if task == "survival":
        return cox_partial_nll
    raise ValueError(f"unknown task {task!r}")


def predict(task: str, output: torch.Tensor) -> torch.Tensor:
    """Turn raw model output into the score metrics use (probability, value, risk)."""
    return torch.sigmoid(output) if task == "binary" else output
