"""The model zoo: every model a study can name, built the same way on server and sites.

All models map a float feature vector to one output (a logit, a value, or a log
hazard ratio) and avoid BatchNorm, so they stay valid under per-sample DP-SGD.
Two personalization methods (never under DP) change the MLP: ``fedbn`` adds
site-local BatchNorm layers, ``fenda`` a site-local extractor and head. Their
``personal_prefixes`` name the tensors that never leave a site
(:func:`federated_keys` is what travels).
"""

from __future__ import annotations

import torch
from torch import nn

from shared.config import ModelOptions


class MLP(nn.Module):
    """Fully connected network: Linear-ReLU(-Dropout) blocks, then one output unit."""

    def __init__(self, n_features: int, hidden: tuple[int, ...], dropout: float = 0.0, bias_out: bool = True, norm: bool = False) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = n_features
        for h in hidden:
            layers += [nn.Linear(width, h), *([nn.BatchNorm1d(h)] if norm else []), nn.ReLU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = h
        layers.append(nn.Linear(width, 1, bias=bias_out))
        self.net = nn.Sequential(*layers)
        # FedBN: the normalisation layers (affine and running statistics) stay at each site.
        self.personal_prefixes = tuple(f"net.{i}." for i, layer in enumerate(layers) if isinstance(layer, nn.BatchNorm1d))

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


def _extractor(n_features: int, hidden: tuple[int, ...], dropout: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    width = n_features
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU(), *([nn.Dropout(dropout)] if dropout > 0 else [])]
        width = h
    return nn.Sequential(*layers)


class Fenda(nn.Module):
    """FENDA-FL: a federated feature extractor and a site-local one, concatenated into a site-local head.

    ``forward`` is the global model (the federated extractor and a federated head, trained
    on the same loss beside the personal one) so every site can also report how the
    global model alone does; :meth:`personal` is the site's FENDA model.
    """

    def __init__(self, n_features: int, hidden: tuple[int, ...], dropout: float = 0.0, bias_out: bool = True) -> None:
        super().__init__()
        self.global_extractor = _extractor(n_features, hidden, dropout)
        self.global_head = nn.Linear(hidden[-1], 1, bias=bias_out)
        self.local_extractor = _extractor(n_features, hidden, dropout)
        self.local_head = nn.Linear(2 * hidden[-1], 1, bias=bias_out)
        self.personal_prefixes = ("local_extractor.", "local_head.")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.global_head(self.global_extractor(x)).squeeze(-1)

    def personal(self, x: torch.Tensor) -> torch.Tensor:
        features = torch.cat([self.global_extractor(x), self.local_extractor(x)], dim=-1)
        return self.local_head(features).squeeze(-1)


def federated_keys(model: nn.Module) -> list[str]:
    """The ``state_dict`` entries that travel (initial weights, deltas); the personal ones stay at the site."""
    personal = getattr(model, "personal_prefixes", ())
    return [k for k in model.state_dict() if not k.startswith(tuple(personal))]


def personal_keys(model: nn.Module) -> list[str]:
    """The ``state_dict`` entries that never leave a site (FedBN's norm layers, FENDA's local parts)."""
    shared = set(federated_keys(model))
    return [k for k in model.state_dict() if k not in shared]


def build_model(
    model: str, task: str, n_features: int, options: ModelOptions | None = None, seed: int | None = None, n_outputs: int = 1,
    personalization: str | None = None,
) -> nn.Module:  # fmt: skip
    """Create a freshly initialised model; a ``seed`` makes the initial weights reproducible.

    ``n_outputs`` is the number of tasks of a multi-task model (one per label column);
    ``personalization`` (the study's method) adds FedBN's norm layers or FENDA's local parts to an MLP.
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
    if model == "mlp" and personalization == "fenda":
        return Fenda(n_features, options.hidden, options.dropout, bias_out=has_bias)
    if model == "mlp":
        return MLP(n_features, options.hidden, options.dropout, bias_out=has_bias, norm=personalization == "fedbn")
    raise ValueError(f"unknown model {model!r}")
