"""Model parameters as plain NumPy arrays, in the model's ``state_dict`` order."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch
from torch import nn

NDArrays = list[np.ndarray]


def get_weights(model: nn.Module, keys: list[str] | None = None) -> NDArrays:
    """The model's tensors, or only those named by ``keys`` (the federated ones of a personalized model)."""
    state = model.state_dict()
    return [state[k].detach().cpu().numpy().copy() for k in (state if keys is None else keys)]


def set_weights(model: nn.Module, weights: NDArrays, keys: list[str] | None = None) -> None:
    """Load ``weights`` into the model's tensors, or only into those named by ``keys`` (the rest stay)."""
    keys = list(model.state_dict().keys()) if keys is None else list(keys)
    if len(keys) != len(weights):
        raise ValueError(f"model has {len(keys)} tensors, got {len(weights)}")
    state = OrderedDict((k, torch.as_tensor(np.asarray(w, dtype=np.float32))) for k, w in zip(keys, weights))
    model.load_state_dict(state, strict=len(keys) == len(model.state_dict()))


def subtract(a: NDArrays, b: NDArrays) -> NDArrays:
    return [x - y for x, y in zip(a, b)]


def l2_norm(arrays: NDArrays) -> float:
    return float(np.sqrt(sum(float(np.sum(np.square(a, dtype=np.float64))) for a in arrays)))


def clip_l2(arrays: NDArrays, bound: float) -> tuple[NDArrays, bool]:
    """Scale ``arrays`` down to L2 norm ``bound`` if larger; also say whether it was clipped."""
    norm = l2_norm(arrays)
    if norm <= bound:
        return arrays, False
    return [a * (bound / norm) for a in arrays], True
