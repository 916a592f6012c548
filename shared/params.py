"""Model parameters as plain NumPy arrays, in the model's ``state_dict`` order."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch
from torch import nn

NDArrays = list[np.ndarray]


def get_weights(model: nn.Module) -> NDArrays:
    return [t.detach().cpu().numpy().copy() for t in model.state_dict().values()]


def set_weights(model: nn.Module, weights: NDArrays) -> None:
    keys = list(model.state_dict().keys())
    if len(keys) != len(weights):
        raise ValueError(f"model has {len(keys)} tensors, got {len(weights)}")
    state = OrderedDict((k, torch.as_tensor(np.asarray(w, dtype=np.float32))) for k, w in zip(keys, weights))
    model.load_state_dict(state, strict=True)


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
