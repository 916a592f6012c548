"""DP-SGD building blocks: exact clipped gradient sums, noisy steps, Poisson sampling, the hazard loss.

Every fast route is checked against a slow reference written here: one sample
at a time, autograd gradient, clipped with factor min(1, C / (norm + 1e-6)), summed.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from client.privacy import dpsgd
from client.privacy.dpsgd import clipped_grad_sum, noisy_step, poisson_batch
from client.privacy.randomness import SecureRandom
from shared.config import ModelOptions
from shared.models import LogisticHazard, build_model
from shared.tasks import hazard_nll_per_patient, per_sample_loss

N_FEATURES = 5
CUTS = (1.0, 2.0, 3.0)


# ----------------------------------------------------------------------------- helpers


def reference_clipped_sum(model: nn.Module, loss_fn, x: torch.Tensor, y: torch.Tensor, max_grad_norm: float):
    """The slow, obviously-correct reference: one sample at a time."""
    params = [p for p in model.parameters() if p.requires_grad]
    total = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    norms = []
    for i in range(len(x)):
        loss = loss_fn(model(x[i : i + 1]), y[i : i + 1]).sum()
        grads = torch.autograd.grad(loss, params)
        norm = math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads))
        factor = min(1.0, max_grad_norm / (norm + 1e-6))
        for t, g in zip(total, grads):
            t += factor * g.double()
        norms.append(norm)
    return {p: t.float() for p, t in zip(params, total)}, torch.tensor(norms, dtype=torch.float64)


def make_case(name: str, n: int = 24, seed: int = 0):
    """(model, per-sample loss, x, y) for one of the model zoo's DP-trainable models."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed + 100)
    x = torch.randn(n, N_FEATURES, generator=gen) * 2.0
    if name == "logistic":
        model = build_model("logistic", "binary", N_FEATURES)
        y = (torch.rand(n, generator=gen) < 0.5).float()
        loss = per_sample_loss("binary", "logistic")
    elif name == "mlp-binary":
        model = build_model("mlp", "binary", N_FEATURES, ModelOptions((8, 4), 0.0))
        y = (torch.rand(n, generator=gen) < 0.5).float()
        loss = per_sample_loss("binary", "mlp")
    elif name == "mlp-regression":
        model = build_model("mlp", "regression", N_FEATURES, ModelOptions((8,), 0.0))
        y = torch.randn(n, generator=gen) * 3.0
        loss = per_sample_loss("regression", "mlp")
    elif name == "hazard":
        model = build_model("hazard", "survival", N_FEATURES, ModelOptions(time_bins=CUTS))
        time = torch.rand(n, generator=gen) * 4.0  # spread over all four intervals
        event = (torch.rand(n, generator=gen) < 0.6).float()
        y = torch.stack([time, event], dim=1)
        loss = per_sample_loss("survival", "hazard", CUTS)
    else:  # pragma: no cover
        raise AssertionError(name)
    return model, loss, x, y


def median_clip(model, loss_fn, x, y) -> float:
    """A clipping norm with per-sample norms on both sides of it."""
    _, norms = reference_clipped_sum(model, loss_fn, x, y, float("inf"))
    return float(norms.median())


CASES = ["logistic", "mlp-binary", "mlp-regression", "hazard"]


# ----------------------------------------------------------------------------- clipped_grad_sum


@pytest.mark.parametrize("route", ["linear", "vmap"])
@pytest.mark.parametrize("case", CASES)
def test_clipped_grad_sum_matches_the_one_sample_reference(case: str, route: str) -> None:
    model, loss_fn, x, y = make_case(case)
    clip = median_clip(model, loss_fn, x, y)
    ref, ref_norms = reference_clipped_sum(model, loss_fn, x, y, clip)
    assert (ref_norms < clip).any() and (ref_norms > clip).any(), "both clipped and unclipped samples must occur"

    grads, norms = clipped_grad_sum(model, loss_fn, x, y, clip, route=route)

    trainable = [p for p in model.parameters() if p.requires_grad]
    assert set(grads) == set(trainable)
    for p in trainable:
        assert grads[p].shape == p.shape
        torch.testing.assert_close(grads[p], ref[p], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(norms.double(), ref_norms, rtol=1e-4, atol=1e-5)
    # the clipped sum really differs from the unclipped one: clipping happened
    unclipped, _ = reference_clipped_sum(model, loss_fn, x, y, float("inf"))
    assert any(not torch.allclose(ref[p], unclipped[p], rtol=1e-3, atol=1e-4) for p in trainable)
    # no .grad is left behind on any parameter
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("route", ["linear", "vmap", "auto"])
def test_hazard_frozen_interval_weight_gets_no_gradient(route: str) -> None:
    model, loss_fn, x, y = make_case("hazard")
    assert isinstance(model, LogisticHazard)
    frozen = model.intervals.weight
    assert not frozen.requires_grad
    grads, _ = clipped_grad_sum(model, loss_fn, x, y, 0.5, route=route)
    assert frozen not in grads
    assert model.intervals.bias in grads and model.score.weight in grads
    assert frozen.grad is None and not frozen.requires_grad
    torch.testing.assert_close(frozen.detach(), torch.ones_like(frozen))


def test_each_per_sample_norm_is_bounded_after_clipping() -> None:
    """With one sample, the clipped sum *is* the clipped gradient: its norm is min(norm, C)."""
    model, loss_fn, x, y = make_case("mlp-binary")
    for i in range(6):
        for route in ("linear", "vmap"):
            grads, norms = clipped_grad_sum(model, loss_fn, x[i : i + 1], y[i : i + 1], 0.3, route=route)
            total = math.sqrt(sum(float(g.pow(2).sum()) for g in grads.values()))
            assert total == pytest.approx(min(float(norms[0]), 0.3), rel=1e-4)


class ScaledLinear(nn.Module):
    """A trainable tensor outside any nn.Linear: the fast path cannot handle it."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.fc = nn.Linear(n, 1)
        self.scale = nn.Parameter(torch.tensor(1.7))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x).squeeze(-1) * self.scale


def test_linear_route_rejects_non_linear_parameters_and_auto_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(4)
    model = ScaledLinear(N_FEATURES)
    _, loss_fn, x, y = make_case("logistic")
    with pytest.raises(ValueError, match="outside nn.Linear"):
        clipped_grad_sum(model, loss_fn, x, y, 1.0, route="linear")

    clip = median_clip(model, loss_fn, x, y)
    ref, ref_norms = reference_clipped_sum(model, loss_fn, x, y, clip)
    assert (ref_norms < clip).any() and (ref_norms > clip).any()

    def no_fast_path(*args, **kwargs):
        raise AssertionError("auto must not take the Linear fast path here")

    monkeypatch.setattr(dpsgd, "_linear_clipped_sum", no_fast_path)
    grads, norms = clipped_grad_sum(model, loss_fn, x, y, clip, route="auto")
    assert set(grads) == {model.fc.weight, model.fc.bias, model.scale}
    for p, g in grads.items():
        torch.testing.assert_close(g, ref[p], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(norms.double(), ref_norms, rtol=1e-4, atol=1e-5)


def test_auto_takes_the_linear_fast_path_for_the_model_zoo(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_vmap(*args, **kwargs):
        raise AssertionError("auto should use the Linear fast path for an all-Linear model")

    monkeypatch.setattr(dpsgd, "_vmap_clipped_sum", no_vmap)
    for case in CASES:
        model, loss_fn, x, y = make_case(case)
        ref, _ = reference_clipped_sum(model, loss_fn, x, y, 0.5)
        grads, _ = clipped_grad_sum(model, loss_fn, x, y, 0.5, route="auto")
        for p, g in grads.items():
            torch.testing.assert_close(g, ref[p], rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- noisy_step


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("case", ["mlp-binary", "hazard"])
def test_noisy_step_without_noise_is_sgd_on_the_clipped_sum_over_expected_batch(case: str) -> None:
    model, loss_fn, x, y = make_case(case)
    clip, lr, expected = median_clip(model, loss_fn, x, y), 0.3, 30.0  # expected != len(x): Opacus's convention
    ref, _ = reference_clipped_sum(model, loss_fn, x, y, clip)
    before = {p: p.detach().clone() for p in model.parameters()}

    noisy_step(
        model, torch.optim.SGD(trainable(model), lr=lr), loss_fn, x, y,
        max_grad_norm=clip, noise_multiplier=0.0, expected_batch_size=expected, noise=SecureRandom.from_seed(0),
    )  # fmt: skip

    for p in model.parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.detach(), before[p] - lr * ref[p] / expected, rtol=1e-5, atol=1e-6)
            assert p.grad is None  # zeroed after the step
        else:
            assert torch.equal(p.detach(), before[p])  # hazard's frozen weight stays put
    if case == "hazard":
        assert not model.intervals.weight.requires_grad


def test_noisy_step_noise_has_std_sigma_c_over_expected_batch() -> None:
    torch.manual_seed(9)
    d, sigma, clip, expected, reps = 400, 1.3, 0.5, 10.0, 25
    model = nn.Sequential(nn.Linear(d, 1), nn.Flatten(0))
    loss_fn = per_sample_loss("binary", "logistic")
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(16, d, generator=gen)
    y = (torch.rand(16, generator=gen) < 0.5).float()
    ref, ref_norms = reference_clipped_sum(model, loss_fn, x, y, clip)
    assert (ref_norms > clip).any()
    mean_grad = torch.cat([ref[p].flatten() for p in model.parameters()]) / expected
    start = copy.deepcopy(model.state_dict())
    noise = SecureRandom.from_seed(2024)
    residuals = []
    for _ in range(reps):
        model.load_state_dict(start)
        before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
        noisy_step(
            model, torch.optim.SGD(model.parameters(), lr=1.0), loss_fn, x, y,
            max_grad_norm=clip, noise_multiplier=sigma, expected_batch_size=expected, noise=noise,
        )  # fmt: skip
        grad = before - torch.cat([p.detach().flatten() for p in model.parameters()])
        residuals.append((grad - mean_grad).double())
    r = torch.cat(residuals)
    target = sigma * clip / expected
    assert abs(float(r.std()) / target - 1.0) < 0.10
    assert abs(float(r.mean())) < 4 * target / math.sqrt(len(r))  # centred on the clipped mean
    # fresh noise every step: two repetitions do not repeat the same draw
    assert not torch.allclose(residuals[0], residuals[1])


def test_noisy_step_noise_is_determined_by_the_generator() -> None:
    def step(seed: int):
        model, loss_fn, x, y = make_case("logistic")
        noisy_step(
            model, torch.optim.SGD(model.parameters(), lr=0.1), loss_fn, x, y,
            max_grad_norm=1.0, noise_multiplier=1.0, expected_batch_size=20.0, noise=SecureRandom.from_seed(seed),
        )  # fmt: skip
        return [p.detach().clone() for p in model.parameters()]

    a, b, c = step(5), step(5), step(6)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not all(torch.equal(u, v) for u, v in zip(a, c))


@pytest.mark.parametrize("case", ["logistic", "hazard"])
def test_empty_batch_is_a_pure_noise_step(case: str) -> None:
    model, loss_fn, x, y = make_case(case)
    x, y = x[:0], y[:0]
    sigma, clip, lr, expected = 1.1, 0.7, 0.5, 4.0

    def step(model, sigma: float, seed: int) -> dict:
        before = {p: p.detach().clone() for p in model.parameters()}
        noisy_step(
            model, torch.optim.SGD(trainable(model), lr=lr), loss_fn, x, y,
            max_grad_norm=clip, noise_multiplier=sigma, expected_batch_size=expected, noise=SecureRandom.from_seed(seed),
        )  # fmt: skip
        return {p: before[p] - p.detach() for p in model.parameters()}

    moved = step(model, sigma, 77)
    for p, change in moved.items():
        if p.requires_grad:
            assert bool((change != 0).all())  # every coordinate of every trainable tensor gets noise
        else:
            assert torch.equal(change, torch.zeros_like(change))  # hazard's frozen weight stays put
    # the same seed replays the same noise; with no noise an empty batch leaves the model where it was
    model2, _, _, _ = make_case(case)
    assert all(torch.equal(a, b) for a, b in zip(moved.values(), step(model2, sigma, 77).values()))
    model3, _, _, _ = make_case(case)
    assert all(torch.equal(c, torch.zeros_like(c)) for c in step(model3, 0.0, 1).values())


def test_empty_batch_noise_has_std_sigma_c_over_expected_batch() -> None:
    torch.manual_seed(3)
    d, sigma, clip, expected = 4000, 0.9, 1.5, 6.0
    model = nn.Sequential(nn.Linear(d, 1), nn.Flatten(0))
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    noisy_step(
        model, torch.optim.SGD(model.parameters(), lr=1.0), per_sample_loss("binary"), torch.empty(0, d), torch.empty(0),
        max_grad_norm=clip, noise_multiplier=sigma, expected_batch_size=expected, noise=SecureRandom.from_seed(5),
    )  # fmt: skip
    grad = (before - torch.cat([p.detach().flatten() for p in model.parameters()])).double()
    target = sigma * clip / expected
    assert abs(float(grad.std()) / target - 1.0) < 0.10
    assert abs(float(grad.mean())) < 4 * target / math.sqrt(len(grad))


# ----------------------------------------------------------------------------- poisson_batch


def test_poisson_batch_size_has_mean_q_times_n() -> None:
    n, q, draws = 1000, 0.05, 400
    rng = SecureRandom.from_seed(3)
    sizes, hits = [], torch.zeros(n)
    for _ in range(draws):
        idx = poisson_batch(n, q, rng)
        assert isinstance(idx, torch.Tensor) and idx.ndim == 1 and idx.dtype == torch.long
        assert len(set(idx.tolist())) == len(idx)  # no repeats within a batch
        assert idx.numel() == 0 or (0 <= int(idx.min()) and int(idx.max()) < n)
        sizes.append(len(idx))
        hits[idx] += 1
    sizes_t = torch.tensor(sizes, dtype=torch.float64)
    se = math.sqrt(n * q * (1 - q) / draws)
    assert abs(float(sizes_t.mean()) - q * n) < 4 * se
    assert float(sizes_t.std()) == pytest.approx(math.sqrt(n * q * (1 - q)), rel=0.15)  # not a fixed-size batch
    assert float(hits.mean()) / draws == pytest.approx(q, rel=0.05)
    # every row can be sampled: over 400 draws at q=0.05 a row is missed with prob ~1e-9
    assert int((hits == 0).sum()) == 0
    # and no row is favoured: per-row inclusion counts are Binomial(draws, q)
    assert float(hits.std()) == pytest.approx(math.sqrt(draws * q * (1 - q)), rel=0.15)


def test_poisson_batch_extremes_and_determinism() -> None:
    assert len(poisson_batch(50, 0.0, SecureRandom.from_seed(0))) == 0
    assert sorted(poisson_batch(50, 1.0, SecureRandom.from_seed(0)).tolist()) == list(range(50))
    a = poisson_batch(200, 0.3, SecureRandom.from_seed(8))
    b = poisson_batch(200, 0.3, SecureRandom.from_seed(8))
    c = poisson_batch(200, 0.3, SecureRandom.from_seed(9))
    assert torch.equal(a, b) and not torch.equal(a, c)


# ----------------------------------------------------------------------------- hazard loss


def test_hazard_nll_per_patient_matches_a_hand_computation() -> None:
    cuts = torch.tensor([10.0, 20.0, 30.0])  # intervals [0,10) [10,20) [20,30) [30,inf)
    logits = torch.tensor(
        [
            [0.3, -1.0, 0.5, 2.0],
            [-0.4, 0.8, -1.2, 0.1],
            [1.5, -0.7, 0.2, -2.0],
        ]
    )
    target = torch.tensor(
        [
            [5.0, 1.0],  # event in interval 0
            [25.0, 0.0],  # censored in interval 2
            [42.0, 1.0],  # event beyond the final cut: last interval
        ]
    )

    def neg_log_sig(z: float) -> float:  # -log sigmoid(z): the event term
        return math.log1p(math.exp(-z))

    def neg_log_one_minus_sig(z: float) -> float:  # -log(1 - sigmoid(z)): the survival term
        return math.log1p(math.exp(z))

    expected = [
        neg_log_sig(0.3),
        neg_log_one_minus_sig(-0.4) + neg_log_one_minus_sig(0.8),
        neg_log_one_minus_sig(1.5) + neg_log_one_minus_sig(-0.7) + neg_log_one_minus_sig(0.2) + neg_log_sig(-2.0),
    ]
    got = hazard_nll_per_patient(logits, target, cuts)
    assert got.shape == (3,)
    torch.testing.assert_close(got, torch.tensor(expected), rtol=1e-6, atol=1e-6)

    # a time exactly on a cut belongs to the later interval ([cuts[k-1], cuts[k]))
    on_cut = hazard_nll_per_patient(logits[:1], torch.tensor([[10.0, 1.0]]), cuts)
    torch.testing.assert_close(on_cut, torch.tensor([neg_log_one_minus_sig(0.3) + neg_log_sig(-1.0)]))
    # the per-patient loss is the sum of its terms: a batch's loss is the sum of the rows'
    torch.testing.assert_close(per_sample_loss("survival", "hazard", (10.0, 20.0, 30.0))(logits, target), got)
