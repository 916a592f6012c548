"""The model zoo: every model a study can name, built the same way on server and sites.

All models map a float feature vector to one output (a logit, a value, or a log
hazard ratio) and avoid BatchNorm, so they stay valid under per-sample DP-SGD.
"""

from __future__ import annotations

import torch
from torch import nn

from shared.config import ModelOptions


class MLP(nn.Module):
    """Fully connected network: Linear-ReLU(-Dropout) blocks, then one output unit."""

    def __init__(self, n_features: int, hidden: tuple[int, ...], dropout: float = 0.0, bias_out: bool = True) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = n_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = h
        layers.append(nn.Linear(width, 1, bias=bias_out))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)


class Linear(nn.Module):
    """One linear layer: logistic regression (with bias) or a linear Cox model (without)."""

    def __init__(self, n_features: int, bias: bool = True) -> None:
        super().__init__()
        self.fc = nn.Linear(n_features, 1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x).squeeze(-1)


class LogisticHazard(nn.Module):
    """Discrete-time survival: logit h_k(x) = b_k + w.x for each time interval k.

    One shared linear score (proportional odds across intervals) plus one
    intercept per interval. Its likelihood is a sum of per-patient terms, so it
    is valid under per-sample DP-SGD, unlike the Cox partial likelihood. The
    intercepts are the bias of a ``Linear(1, K)`` whose weight is frozen at 1,
    so every trainable tensor lives in an ``nn.Linear``.
    """

    def __init__(self, n_features: int, n_intervals: int) -> None:
        super().__init__()
        self.score = nn.Linear(n_features, 1, bias=False)
        self.intervals = nn.Linear(1, n_intervals)
        with torch.no_grad():
            self.intervals.weight.fill_(1.0)
            self.intervals.bias.fill_(-3.0)  # small baseline hazard per interval
        self.intervals.weight.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.intervals(self.score(x))


def build_model(model: str, task: str, n_features: int, options: ModelOptions | None = None, seed: int | None = None, n_outputs: int = 1) -> nn.Module:
    """Create a freshly initialised model; a ``seed`` makes the initial weights reproducible.

    ``n_outputs`` is the number of tasks of a multi-task model (one per label column).
    """
    options = options or ModelOptions()
    if seed is not None:
        torch.manual_seed(seed)
    if model == "gnn":  # PyG imported only for molecule studies
        from shared.gnn import MoleculeGNN

        widths = options.hidden if len(options.hidden) == options.layers else options.hidden[:1] * options.layers
        return MoleculeGNN(n_features, n_outputs, widths, options.conv, options.pooling)
    # A Cox model's intercept cancels out of the partial likelihood: leave it out.
    has_bias = task != "survival"
    if model in ("logistic", "cox"):
        return Linear(n_features, bias=has_bias)
    if model == "hazard":
        return LogisticHazard(n_features, len(options.time_bins) + 1)
    if model == "mlp":
        return MLP(n_features, options.hidden, options.dropout, bias_out=has_bias)
    raise ValueError(f"unknown model {model!r}")
