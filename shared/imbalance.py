"""Rare positives: the pooled label counts, and what they set (output bias, balanced pos_weight).

A model whose output bias starts at 0 predicts 50% positives; on a set with 3.5%
positives its first rounds are spent pushing every probability down, and with a
sum pooling it can do so through molecule size ("more atoms, lower logit")
instead of learning anything about the positives. Starting the bias at the pooled
training log-odds makes round 1 start at the constant predictor, so every later
step is about ranking. The counts come from the secure label round: each site
sends, per label, its fraction of positive and of known training labels, weighted
by its n_train through SecAgg+, and the coordinator sees only the pooled fractions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

MAX_LOG_ODDS = 12.0  # a label with (almost) no positives or negatives: a finite, still extreme bias
MAX_POS_WEIGHT = 1e4  # pos_weight when a label has no pooled positive at all


def label_moments(y_train: np.ndarray) -> np.ndarray:
    """Per label (columns of a multitask ``y``, else one), the fraction of positive and of known labels.

    One block of positive fractions, then one block of known fractions (unknown = NaN).
    """
    y = np.asarray(y_train, dtype=np.float64)
    y = y.reshape(len(y), -1)
    known = ~np.isnan(y)
    if len(y) == 0:
        return np.zeros(2 * y.shape[1])
    return np.concatenate([(np.nan_to_num(y) * known).mean(axis=0), known.mean(axis=0)])


@dataclass(frozen=True)
class PooledLabels:
    """Pooled fractions over every site's training rows, per label (of all training rows)."""

    positive: np.ndarray
    known: np.ndarray

    @classmethod
    def from_moments(cls, values: np.ndarray) -> PooledLabels:
        values = np.asarray(values, dtype=np.float64)
        half = len(values) // 2
        return cls(np.clip(values[:half], 0.0, None), np.clip(values[half:], 0.0, None))

    @property
    def prevalence(self) -> np.ndarray:
        """Positives among the known labels, per label (0.5 where no label is known)."""
        return np.where(self.known > 0, self.positive / np.maximum(self.known, 1e-12), 0.5)

    def log_odds(self) -> np.ndarray:
        """The output bias of the constant predictor at the pooled prevalence, clipped to stay finite."""
        p = np.clip(self.prevalence, 1e-12, 1 - 1e-12)
        return np.clip(np.log(p) - np.log1p(-p), -MAX_LOG_ODDS, MAX_LOG_ODDS)

    def balanced_pos_weight(self) -> list[float]:
        """Negatives / positives per label: each class then weighs the same in the loss."""
        negative = np.clip(self.known - self.positive, 0.0, None)
        ratio = np.where(self.positive > 0, negative / np.maximum(self.positive, 1e-12), MAX_POS_WEIGHT)
        return [float(min(max(r, 1.0 / MAX_POS_WEIGHT), MAX_POS_WEIGHT)) for r in ratio]


def output_layer(model: nn.Module) -> nn.Linear:
    """The layer that produces the logits: the GNN's ``out``, else the last Linear with a bias."""
    out = getattr(model, "out", None)
    if isinstance(out, nn.Linear):
        return out
    layers = [m for m in model.modules() if isinstance(m, nn.Linear) and m.bias is not None]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no output bias")
    return layers[-1]


@torch.no_grad()
def set_output_bias(model: nn.Module, bias: np.ndarray) -> None:
    """Set the logits' bias (one per output; one value is broadcast to every output)."""
    layer = output_layer(model)
    values = torch.as_tensor(np.asarray(bias, dtype=np.float32)).reshape(-1)
    if values.numel() not in (1, layer.bias.numel()):
        raise ValueError(f"{values.numel()} bias values for {layer.bias.numel()} outputs")
    layer.bias.copy_(values.expand_as(layer.bias) if values.numel() == 1 else values)


def describe(pooled: PooledLabels, names: list[str]) -> str:
    """'p_np 3.5% (bias -3.32)' per label, for the coordinator's log."""
    return ", ".join(f"{n} {100 * p:.1f}% (bias {b:+.2f})" for n, p, b in zip(names, pooled.prevalence, pooled.log_odds())) or "none"
