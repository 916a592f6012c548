"""DP-SGD steps: per-sample clipping, Gaussian noise, Poisson sampling.

Two exact routes to the sum of per-sample clipped gradients:

* **Linear fast path** ("book-keeping" ghost clipping, Bu et al. 2022): when every
  trainable tensor lives in an ``nn.Linear`` applied to 2-D inputs, the gradient
  of sample i for that layer is the outer product ``g_i a_i^T`` of the layer's
  output gradient and input. Its norm is ``|g_i| |a_i|`` and the clipped sum is
  ``(c * G)^T A``: one forward, one backward, no per-sample gradient tensors.
  A layer may also see several rows per sample (``[B, T, in]``: the atoms of a
  padded molecule): sample i's gradient is then ``G_i^T A_i``, summed over its
  rows, with squared norm ``<A_i A_i^T, G_i G_i^T>`` (the "ghost norm", for
  few rows) or ``|G_i^T A_i|^2`` (for many), whichever is cheaper. The rows
  may also come unpadded with an index naming each row's sample (``row_samples``:
  the atoms of a PyG sparse batch and its ``batch`` vector); they are padded
  only for the norms, and the clipped sum is still ``(c * G)^T A`` over rows.
* **Generic path**: ``torch.func.vmap(grad(...))`` per-sample gradients, for any model.

Both are checked against a slow one-sample-at-a-time reference in the tests.
Noise is added once to the clipped sum, scaled to ``sigma * C``, and the result
divided by the *expected* batch size ``q * n`` (Opacus's convention for Poisson
sampling), so an empty batch is a valid step of pure noise. Noise and batches come
only from :class:`client.privacy.randomness.SecureRandom` (ChaCha20, 256-bit key):
a torch or NumPy generator is refused, since its seed can be searched.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from client.privacy.randomness import SecureRandom

PerSampleLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def linear_layers(model: nn.Module, types: tuple[type[nn.Module], ...] = (nn.Linear,)) -> list[nn.Module] | None:
    """The Linear layers holding every trainable tensor (fast path), or ``None`` (generic path).

    ``types`` names the modules that compute ``a @ weight.T + bias`` over the last
    dimension (e.g. PyG's ``Linear`` as well); each must be applied once per forward.
    """
    layers = [m for m in model.modules() if isinstance(m, types) and any(p.requires_grad for p in m.parameters(recurse=False))]
    covered = {id(p) for m in layers for p in m.parameters(recurse=False)}
    if any(p.requires_grad and id(p) not in covered for p in model.parameters()):
        return None
    return layers


def _clip_factors(sq_norms: torch.Tensor, max_grad_norm: float) -> tuple[torch.Tensor, torch.Tensor]:
    norms = sq_norms.clamp_min(0).sqrt()
    return (max_grad_norm / (norms + 1e-6)).clamp(max=1.0), norms


def _layer_sq_norms(layer: nn.Module, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Per-sample squared gradient norm of one Linear layer from its inputs ``a`` and output gradients ``g``."""
    weight = layer.weight.requires_grad
    bias = layer.bias is not None and layer.bias.requires_grad
    if a.ndim == 2:
        g_norm = torch.linalg.vector_norm(g, dim=1)  # faster here than pow(2).sum(1)
        sq = (torch.linalg.vector_norm(a, dim=1) * g_norm).square() if weight else torch.zeros_like(g_norm)  # |g_i a_i^T| = |g_i| |a_i|
        return sq + g_norm.square() if bias else sq
    rows, n_in, n_out = a.shape[1], a.shape[2], g.shape[2]
    sq = torch.zeros(a.shape[0], dtype=a.dtype)
    if weight and rows * (n_in + n_out) < n_in * n_out:  # ghost norm: <A A^T, G G^T>, no [B, out, in] tensor
        sq = sq + (torch.bmm(a, a.mT) * torch.bmm(g, g.mT)).sum((1, 2))
    elif weight:
        sq = sq + torch.bmm(g.mT, a).square().sum((1, 2))
    return sq + g.sum(1).square().sum(1) if bias else sq


def _padding(owner: torch.Tensor, n: int) -> tuple[torch.Tensor, int]:
    """Position of each row within its sample (rows of a sample contiguous, as in PyG's ``batch``) and the most rows."""
    counts = torch.bincount(owner, minlength=n)
    starts = torch.cumsum(counts, 0) - counts
    return torch.arange(owner.shape[0]) - starts[owner], int(counts.max()) if n else 0


def _padded(t: torch.Tensor, owner: torch.Tensor, local: torch.Tensor, n: int, most: int) -> torch.Tensor:
    out = t.new_zeros(n, most, t.shape[-1])
    out[owner, local] = t
    return out


def _linear_factors(model, layers, loss_fn, x, y, max_grad_norm, row_samples=None):
    """Per layer: inputs A and output gradients G (rows of all samples); per sample: clip factors and norms."""
    inputs: dict[nn.Module, torch.Tensor] = {}
    outputs: dict[nn.Module, torch.Tensor] = {}

    def keep(module, args, output):
        if module in inputs:  # a second call would overwrite the first's input: the sums would be wrong
            raise ValueError("the Linear fast path needs every layer applied once per forward")
        inputs[module] = args[0].detach()
        outputs[module] = output

    rows = int(y.shape[0])
    handles = [layer.register_forward_hook(keep) for layer in layers]
    try:
        losses = loss_fn(model(*x) if isinstance(x, tuple) else model(x), y)
    finally:
        for handle in handles:
            handle.remove()
    out_grads = torch.autograd.grad(losses.sum(), [outputs[layer] for layer in layers])
    sq = torch.zeros(rows, dtype=losses.dtype)
    owners = row_samples or {}
    paddings: dict[int, tuple[torch.Tensor, int]] = {}
    kept = []
    for layer, g in zip(layers, out_grads):
        a, owner = inputs[layer], owners.get(layer)
        if owner is not None:  # unpadded rows, owner[r] = the sample of row r
            if a.ndim != 2 or a.shape[0] != owner.shape[0]:
                raise ValueError("row_samples must name the sample of every input row of its layer")
            local, most = paddings.setdefault(id(owner), _padding(owner, rows))
            sq = sq + _layer_sq_norms(layer, _padded(a, owner, local, rows, most), _padded(g, owner, local, rows, most))
        elif a.ndim < 2 or a.shape[0] != rows:
            raise ValueError("the Linear fast path needs layer inputs whose first dimension is the sample")
        else:
            if a.ndim > 3:
                a, g = a.reshape(rows, -1, a.shape[-1]), g.reshape(rows, -1, g.shape[-1])
            sq = sq + _layer_sq_norms(layer, a, g)
        kept.append((layer, a, g, owner))
    factors, norms = _clip_factors(sq, max_grad_norm)
    out = []
    for layer, a, g, owner in kept:
        if owner is not None:
            scaled = g * factors[owner].unsqueeze(1)
        else:
            scaled = g * factors.view(-1, *([1] * (g.ndim - 1)))
        out.append((layer, a.reshape(-1, a.shape[-1]), scaled.reshape(-1, g.shape[-1])))  # rows of all samples
    return out, norms


def _linear_clipped_sum(model, layers, loss_fn, x, y, max_grad_norm, row_samples=None):
    scaled_layers, norms = _linear_factors(model, layers, loss_fn, x, y, max_grad_norm, row_samples)
    grads: dict[nn.Parameter, torch.Tensor] = {}
    for layer, a, scaled in scaled_layers:
        if layer.weight.requires_grad:
            grads[layer.weight] = scaled.T @ a
        if layer.bias is not None and layer.bias.requires_grad:
            grads[layer.bias] = scaled.sum(0)
    return grads, norms


def _rows(x: torch.Tensor | tuple[torch.Tensor, ...]) -> int:
    """Samples in a batch; a tuple holds several per-sample inputs (e.g. a padded graph's parts)."""
    return int(x[0].shape[0]) if isinstance(x, tuple) else int(x.shape[0])


def _vmap_clipped_sum(model, loss_fn, x, y, max_grad_norm):
    from torch.func import functional_call, grad, vmap

    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
    buffers = dict(model.named_buffers())

    def one(p, xi, yi):
        args = tuple(t.unsqueeze(0) for t in xi) if isinstance(xi, tuple) else (xi.unsqueeze(0),)
        out = functional_call(model, {**p, **frozen, **buffers}, args)
        return loss_fn(out, yi.unsqueeze(0)).sum()

    per_sample = vmap(grad(one), in_dims=(None, 0, 0), randomness="different")(params, x, y)
    sq = sum(per_sample[n].reshape(_rows(x), -1).pow(2).sum(1) for n in names)
    factors, norms = _clip_factors(sq, max_grad_norm)
    lookup = dict(model.named_parameters())
    grads = {lookup[n]: torch.einsum("b,b...->...", factors, per_sample[n]) for n in names}
    return grads, norms


def clipped_grad_sum(
    model: nn.Module, loss_fn: PerSampleLoss, x: torch.Tensor | tuple[torch.Tensor, ...], y: torch.Tensor, max_grad_norm: float,
    *, route: str = "auto", layers: list[nn.Module] | None = None, row_samples: dict[nn.Module, torch.Tensor] | None = None,
):  # fmt: skip
    """Sum over the batch of per-sample gradients clipped to ``max_grad_norm``.

    Returns ``({parameter: summed clipped gradient}, per-sample gradient norms before clipping)``.
    ``loss_fn`` must return one loss per row (a batch-coupled loss is not DP-valid).
    ``x`` may be a tuple of per-sample inputs (the model is called as ``model(*x)``);
    those take the generic path unless ``route="linear"`` (with ``layers`` for layer
    types other than ``nn.Linear``, and ``row_samples`` for layers whose input rows
    are not samples: ``{layer: sample index of each row}``).
    """
    if isinstance(x, tuple) and route == "auto":
        route = "vmap"
    if layers is None and route in ("auto", "linear"):
        layers = linear_layers(model)
    if route == "linear" and layers is None:
        raise ValueError("model has trainable tensors outside nn.Linear layers")
    if layers is not None:
        return _linear_clipped_sum(model, layers, loss_fn, x, y, max_grad_norm, row_samples)
    return _vmap_clipped_sum(model, loss_fn, x, y, max_grad_norm)


def noisy_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: PerSampleLoss,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    max_grad_norm: float,
    noise_multiplier: float,
    expected_batch_size: float,
    noise: SecureRandom,
    layers: list[nn.Module] | None | str = "find",
    row_samples: dict[nn.Module, torch.Tensor] | None = None,
) -> None:
    """One DP-SGD step on an (already Poisson-sampled, possibly empty) batch.

    Each gradient is ``(sum of clipped per-sample gradients + N(0, (sigma C)^2)) / (q n)``.
    On the Linear fast path noise, clipped sum and scaling are fused into one
    ``addmm`` per weight, so the step costs little more than a plain one.
    ``x`` may be a tuple of per-sample inputs (e.g. padded graphs): those take the
    generic path unless ``layers`` lists the model's Linear layers explicitly, with
    ``row_samples`` naming the sample of each input row where rows are not samples
    (e.g. atoms of a PyG sparse batch: ``{layer: batch}``). ``noise`` must be a
    :class:`SecureRandom`: the coordinator must not be able to replay the noise.
    """
    _require_secure(noise)
    params = [p for p in model.parameters() if p.requires_grad]
    std = noise_multiplier * max_grad_norm
    scale = 1.0 / expected_batch_size
    # One standard-normal draw for all tensors, split per parameter.
    gaussian = noise.normal(sum(p.numel() for p in params))
    chunks, offset = {}, 0
    for p in params:
        chunks[p] = gaussian[offset : offset + p.numel()].view_as(p)
        offset += p.numel()
    if isinstance(x, tuple) and isinstance(layers, str):  # several inputs per sample: generic unless layers are named
        layers = None
    if isinstance(layers, str):  # callers looping over steps pass linear_layers(model) once
        layers = linear_layers(model)
    rows = int(y.shape[0])
    if layers is not None and rows:
        scaled_layers, _ = _linear_factors(model, layers, loss_fn, x, y, max_grad_norm, row_samples)
        for layer, a, scaled in scaled_layers:
            if layer.weight.requires_grad:
                layer.weight.grad = torch.addmm(chunks.pop(layer.weight), scaled.T, a, beta=std * scale, alpha=scale)
            if layer.bias is not None and layer.bias.requires_grad:
                layer.bias.grad = torch.add(scaled.sum(0), chunks.pop(layer.bias), alpha=std).mul_(scale)
    elif rows:
        grads = clipped_grad_sum(model, loss_fn, x, y, max_grad_norm)[0]
        for p, summed in grads.items():
            p.grad = torch.add(summed, chunks.pop(p), alpha=std).mul_(scale)
    for p, chunk in chunks.items():  # tensors with no data this step (e.g. an empty batch): noise only
        p.grad = chunk.mul(std * scale)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def poisson_batch(n: int, sample_rate: float, rng: SecureRandom) -> torch.Tensor:
    """Indices of a Poisson-sampled batch: every row joins independently with probability q.

    Secret batch selection is what privacy amplification by sampling assumes, so
    ``rng`` must be a :class:`SecureRandom` (see its ``poisson_indices``).
    """
    _require_secure(rng)
    return rng.poisson_indices(n, sample_rate)


def _require_secure(source: object) -> None:
    if not isinstance(source, SecureRandom):
        raise TypeError(f"DP randomness must come from SecureRandom, not {type(source).__name__} (a searchable seed)")
