"""Per-molecule DP-SGD on dense padded graphs against a slow one-molecule reference.

The reference runs the ordinary (sparse PyG) model on each molecule alone, so it
shares nothing with the fast routes but the parameters: padding, the dense
layers, the per-molecule gradients (vmap, or the Linear fast path's per-atom
outer products, with ghost or materialised norms) and the clipping are all
checked at once.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from client.graph_trainer import atom_rows, molecule_dp_step, molecule_layers
from client.privacy.dpsgd import clipped_grad_sum, noisy_step
from client.privacy.randomness import SecureRandom
from shared.config import ModelOptions
from shared.gnn import DenseView, dense_batch, sparse_batch
from shared.models import build_model
from shared.molecules import ATOM_FEATURES, featurise
from shared.tasks import per_sample_loss

SMILES = ["CCO", "c1ccccc1", "CC(=O)Oc1ccccc1C(=O)O", "[Na+].[Cl-]", "C", "CCN(CC)CC", "O=C(O)c1ccncc1", "ClC(Cl)Cl"]


def _case(task: str, conv: str, pooling: str, width: int = 12):
    graphs, _ = featurise(SMILES)
    torch.manual_seed(3)
    outputs = 3 if task == "multitask" else 1
    model = build_model("gnn", task, len(ATOM_FEATURES), ModelOptions(hidden=(width,), layers=2, conv=conv, pooling=pooling), seed=1, n_outputs=outputs)
    if task == "multitask":
        y = (torch.rand(len(graphs), 3) > 0.5).float()
        y[torch.rand(len(graphs), 3) > 0.6] = float("nan")  # unknown labels
    elif task == "binary":
        y = (torch.rand(len(graphs)) > 0.5).float()
    else:
        y = torch.randn(len(graphs)) * 3
    return model, graphs, y, per_sample_loss(task)


def reference(model, graphs, y, loss_fn, clip: float):
    """One molecule at a time through the sparse model: clip each gradient, then sum."""
    params = [p for p in model.parameters() if p.requires_grad]
    total = [torch.zeros_like(p) for p in params]
    norms = []
    for g, yi in zip(graphs, y):
        loss = loss_fn(model(*sparse_batch([g])), yi.unsqueeze(0)).sum()
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        grads = [torch.zeros_like(p) if gr is None else gr for p, gr in zip(params, grads)]
        norm = torch.sqrt(sum((gr**2).sum() for gr in grads))
        norms.append(float(norm))
        factor = min(1.0, clip / (float(norm) + 1e-6))
        total = [t + factor * gr for t, gr in zip(total, grads)]
    return dict(zip(params, total)), np.array(norms)


@pytest.mark.parametrize(("task", "conv", "pooling"), [("regression", "graphconv", "mean"), ("binary", "gin", "add"), ("multitask", "graphconv", "add")])
def test_per_molecule_clipped_sum_equals_the_one_molecule_reference(task: str, conv: str, pooling: str) -> None:
    model, graphs, y, loss_fn = _case(task, conv, pooling)
    _, raw = reference(model, graphs, y, loss_fn, float("inf"))
    clip = float(np.median(raw))  # about half the molecules get clipped
    ref, ref_norms = reference(model, graphs, y, loss_fn, clip)
    fast, norms = clipped_grad_sum(DenseView(model), loss_fn, dense_batch(graphs), y, clip)
    assert np.allclose(norms.numpy(), ref_norms, rtol=1e-4, atol=1e-6)
    assert (ref_norms > clip).sum() >= 2 and (ref_norms < clip).sum() >= 2
    assert set(fast) == set(ref)
    for p in ref:
        assert torch.allclose(fast[p], ref[p], rtol=1e-4, atol=1e-6)


# Width 12: per-molecule norms from materialised [out, in] gradients; width 64: ghost norms
# (few atoms per molecule against wide layers). Molecules have 1 to 13 atoms, so most are padded
# (dense layout: in the batch; sparse layout, what training runs: for the norms only).
@pytest.mark.parametrize("layout", ["sparse", "dense"])
@pytest.mark.parametrize(
    ("task", "conv", "pooling", "width"),
    [
        ("regression", "graphconv", "mean", 12), ("regression", "graphconv", "add", 64), ("binary", "gin", "add", 12),
        ("binary", "gin", "mean", 64), ("multitask", "graphconv", "add", 12), ("multitask", "gin", "mean", 64),
    ],
)  # fmt: skip
def test_linear_fast_path_per_molecule_clipped_sum_equals_the_one_molecule_reference(task: str, conv: str, pooling: str, width: int, layout: str) -> None:
    model, graphs, y, loss_fn = _case(task, conv, pooling, width)
    layers = molecule_layers(model)
    assert layers is not None  # every trainable tensor of the GNN sits in a Linear layer
    _, raw = reference(model, graphs, y, loss_fn, float("inf"))
    clip = float(np.median(raw))
    ref, ref_norms = reference(model, graphs, y, loss_fn, clip)
    if layout == "sparse":
        batch = sparse_batch(graphs)
        fast, norms = clipped_grad_sum(model, loss_fn, batch, y, clip, route="linear", layers=layers, row_samples=atom_rows(model, layers, batch[2]))
    else:
        fast, norms = clipped_grad_sum(DenseView(model), loss_fn, dense_batch(graphs), y, clip, route="linear", layers=layers)
    assert (ref_norms > clip).sum() >= 2 and (ref_norms < clip).sum() >= 2
    assert np.allclose(norms.numpy(), ref_norms, rtol=1e-4, atol=1e-6)
    assert set(fast) == set(ref)
    for p in ref:
        assert torch.allclose(fast[p], ref[p], rtol=1e-4, atol=1e-5)


def test_linear_fast_path_refuses_a_layer_applied_twice() -> None:
    model, graphs, y, loss_fn = _case("regression", "gin", "add")

    class Twice(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gnn = model

        def forward(self, x, adj, mask):
            return self.gnn.forward_dense(x, adj, mask) + self.gnn.forward_dense(x, adj, mask)

    twice = Twice()
    with pytest.raises(ValueError, match="once per forward"):
        clipped_grad_sum(twice, loss_fn, dense_batch(graphs), y, 1.0, route="linear", layers=molecule_layers(twice))


def test_a_molecule_is_one_privacy_unit_however_many_atoms_it_has() -> None:
    model, graphs, y, loss_fn = _case("regression", "graphconv", "add")
    _, norms = clipped_grad_sum(DenseView(model), loss_fn, dense_batch(graphs), y, 1e-3)
    assert norms.shape == (len(graphs),)  # one norm per molecule, not per atom


@pytest.mark.parametrize(("conv", "route"), [("gin", "vmap"), ("gin", "fast"), ("graphconv", "fast")])
def test_dp_step_without_noise_moves_the_gnn_by_the_clipped_reference_sum(conv: str, route: str) -> None:
    model, graphs, y, loss_fn = _case("multitask", conv, "mean")
    clip, lr, expected = 0.5, 0.1, 6.0
    ref, norms = reference(model, graphs, y, loss_fn, clip)
    assert (norms > clip).any() and (norms < clip).any()
    before = {p: p.detach().clone() for p in ref}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    layers = molecule_layers(model) if route == "fast" else None  # None: dense padded graphs + vmap(grad)
    molecule_dp_step(model, layers, optimizer, loss_fn, graphs, y, max_grad_norm=clip, noise_multiplier=0.0, expected_batch_size=expected, noise=SecureRandom.from_seed(0), max_atoms=64)
    for p, g in ref.items():
        assert torch.allclose(p.detach(), before[p] - lr * g / expected, rtol=1e-4, atol=1e-6)


def test_dp_step_on_an_empty_batch_is_pure_noise() -> None:
    model, _, y, loss_fn = _case("regression", "graphconv", "add")
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    molecule_dp_step(model, molecule_layers(model), optimizer, loss_fn, [], y[:0], max_grad_norm=1.0, noise_multiplier=1.0, expected_batch_size=4.0, noise=SecureRandom.from_seed(0), max_atoms=64)
    assert all(not torch.equal(p.detach(), b) for p, b in zip(model.parameters(), before))


def test_dense_batch_refuses_molecules_above_the_public_cap() -> None:
    graphs, _ = featurise(["CCO", "CCCCCCCCCC"])
    with pytest.raises(ValueError, match="max_atoms"):
        dense_batch(graphs, max_atoms=5)
