"""Local training at a site: reproducible, FedProx pulls towards the global model, deltas are honest."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from client.app import SiteClient
from client.site_data import load_for_plan
from client.trainer import batches, derived_seed, evaluate, train
from shared.config import ModelOptions, parse_site
from shared.contract import SiteData
from shared.errors import FedhelixError
from shared.models import build_model
from shared.params import get_weights, l2_norm, set_weights
from shared.plan import PLAN_KEY, ROUND_KEY, TrainingPlan


@pytest.fixture(autouse=True, scope="module")
def _warm_torch():
    """The first optimiser step of a process pays a one-off import cost (~2 s); keep it out of the tests."""
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.Adam(model.parameters())
    model(torch.zeros(1, 2)).sum().backward()
    opt.step()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    yield


def plan_for(task: str = "regression", model: str = "mlp", **kw) -> TrainingPlan:
    base = dict(
        study="unit",
        task=task,
        model=model,
        local_steps=20,
        batch_size=8,
        learning_rate=0.05,
        optimizer="sgd",
        proximal_mu=0.0,
        seed=11,
        model_options=ModelOptions((8,), 0.0),
    )
    base.update(kw)
    return TrainingPlan(**base)


def regression_data(n: int = 60, site: str = "alpha", seed: int = 0) -> SiteData:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4)).astype(np.float32)
    y = (x @ np.array([1.0, -2.0, 0.5, 0.0]) + 0.1 * rng.normal(size=n)).astype(np.float32)
    cut = int(0.8 * n)
    return SiteData(site, ("a", "b", "c", "d"), x[:cut], y[:cut], x[cut:], y[cut:])


def trained_weights(plan: TrainingPlan, data: SiteData, server_round: int, init_seed: int = 3):
    model = build_model(plan.model, plan.task, len(data.feature_names), plan.model_options, seed=init_seed)
    start = get_weights(model)
    metrics = train(model, data, plan, server_round)
    return start, get_weights(model), metrics


def distance(a, b) -> float:
    return l2_norm([x - y for x, y in zip(a, b)])


# ----------------------------------------------------------------------------- reproducibility


def test_same_plan_site_round_gives_identical_weights() -> None:
    plan = plan_for(model_options=ModelOptions((8,), 0.3))  # dropout: the torch RNG is seeded too
    data = regression_data()
    _, first, m1 = trained_weights(plan, data, 2)
    torch.manual_seed(12345)  # whatever state the process is in must not matter
    np.random.seed(999)
    _, second, m2 = trained_weights(plan, data, 2)
    assert all(np.array_equal(a, b) for a, b in zip(first, second))
    assert m1 == m2


def test_different_round_site_or_seed_shuffle_differently() -> None:
    plan = plan_for()
    data = regression_data()
    start, base, _ = trained_weights(plan, data, 1)
    assert distance(start, base) > 1e-3  # it trained at all
    _, other_round, _ = trained_weights(plan, data, 2)
    _, other_site, _ = trained_weights(plan, dataclasses.replace(data, site="beta"), 1)
    _, other_seed, _ = trained_weights(plan_for(seed=12), data, 1)
    for other in (other_round, other_site, other_seed):
        assert not all(np.array_equal(a, b) for a, b in zip(base, other))


def test_derived_seed_is_stable_and_part_sensitive() -> None:
    seed = derived_seed(42, "alpha", 1)
    assert seed == derived_seed(42, "alpha", 1)
    assert 0 <= seed < 2**63
    assert len({seed, derived_seed(42, "alpha", 2), derived_seed(42, "beta", 1), derived_seed(43, "alpha", 1), derived_seed(42, "alpha", 1, "init")}) == 5


# ----------------------------------------------------------------------------- batches


def test_batches_cover_every_index_once_per_pass() -> None:
    gen = torch.Generator().manual_seed(0)
    out = [b.tolist() for b in batches(12, 4, 9, gen)]
    assert len(out) == 9 and all(len(b) == 4 for b in out)
    passes = [sum(out[i : i + 3], []) for i in (0, 3, 6)]
    for p in passes:
        assert sorted(p) == list(range(12))
    assert len({tuple(p) for p in passes}) == 3  # reshuffled between passes


def test_batches_with_remainder_never_repeat_within_a_pass() -> None:
    # 10 rows, batches of 3: three full batches per pass, the remainder waits for the next shuffle
    gen = torch.Generator().manual_seed(1)
    out = [b.tolist() for b in batches(10, 3, 12, gen)]
    assert all(len(b) == 3 for b in out)
    for i in range(0, 12, 3):
        seen = sum(out[i : i + 3], [])
        assert len(set(seen)) == 9 and set(seen) <= set(range(10))
    assert set(sum(out, [])) == set(range(10))  # over several passes every row is used


def test_batch_larger_than_data_is_the_whole_data_each_step() -> None:
    gen = torch.Generator().manual_seed(2)
    out = [b.tolist() for b in batches(5, 32, 3, gen)]
    assert all(sorted(b) == list(range(5)) for b in out)


def test_batches_are_determined_by_the_generator() -> None:
    first = [b.tolist() for b in batches(20, 6, 7, torch.Generator().manual_seed(5))]
    again = [b.tolist() for b in batches(20, 6, 7, torch.Generator().manual_seed(5))]
    other = [b.tolist() for b in batches(20, 6, 7, torch.Generator().manual_seed(6))]
    assert first == again and first != other


# ----------------------------------------------------------------------------- FedProx


@pytest.mark.parametrize(("optimizer", "lr", "mu"), [("sgd", 0.05, 20.0), ("adam", 0.01, 1e4)])
def test_fedprox_large_mu_stays_near_the_global_start(optimizer: str, lr: float, mu: float) -> None:
    data = regression_data()
    start, free, _ = trained_weights(plan_for(optimizer=optimizer, learning_rate=lr, local_steps=40), data, 1)
    _, held, metrics = trained_weights(plan_for(optimizer=optimizer, learning_rate=lr, local_steps=40, proximal_mu=mu), data, 1)
    assert all(np.isfinite(w).all() for w in held)
    assert distance(start, free) > 0.2
    assert distance(start, held) < 0.2 * distance(start, free)
    assert np.isfinite(metrics["train_loss"])


def test_fedprox_mu_zero_is_plain_training() -> None:
    data = regression_data()
    _, a, _ = trained_weights(plan_for(proximal_mu=0.0), data, 1)
    _, b, _ = trained_weights(plan_for(proximal_mu=1e-3), data, 1)
    assert not all(np.array_equal(x, y) for x, y in zip(a, b))  # any mu > 0 changes the objective


# ----------------------------------------------------------------------------- Cox model


def survival_data(n: int = 300, seed: int = 0) -> SiteData:
    """Hazard exp(1.5 * x0): x0 is the risk; the other features are noise; ~independent censoring."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 5)).astype(np.float32)
    event_time = rng.exponential(1.0 / np.exp(1.5 * x[:, 0]))
    censor_time = rng.exponential(2.0, size=n)
    y = np.stack([np.minimum(event_time, censor_time), (event_time <= censor_time).astype(float)], axis=1).astype(np.float32)
    cut = 200
    return SiteData("surv", tuple(f"x{i}" for i in range(5)), x[:cut], y[:cut], x[cut:], y[cut:])


def test_linear_cox_learns_a_planted_signal() -> None:
    data = survival_data()
    plan = plan_for(task="survival", model="cox", local_steps=100, batch_size=32, learning_rate=0.1)
    model = build_model("cox", "survival", 5, seed=3)
    assert [p.shape for p in model.parameters()] == [torch.Size([1, 5])]  # no intercept in a Cox model
    loss_before, before = evaluate(model, data, plan)
    metrics = train(model, data, plan, 1)
    loss_after, after = evaluate(model, data, plan)
    assert after["c_index"] > 0.7
    assert after["c_index"] > before["c_index"]
    assert loss_after < loss_before and np.isfinite(metrics["train_loss"])
    coef = get_weights(model)[0].ravel()
    assert coef[0] > 0.5 and np.argmax(np.abs(coef)) == 0
    # train-split evaluation is available too and also concordant
    assert evaluate(model, data, plan, split="train")[1]["c_index"] > 0.7


# ----------------------------------------------------------------------------- SiteClient


def write_site(tmp_path: Path, name: str = "st-anne", n: int = 60, seed: int = 0):
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame(rng.normal(size=(n, 3)), columns=["a", "b", "c"])
    frame["y"] = 2 * frame["a"] - frame["b"] + 0.1 * rng.normal(size=n)
    path = tmp_path / f"{name}.csv"
    frame.to_csv(path, index=False)
    site = parse_site({"site": {"name": name}, "data": {"path": str(path), "label": "y"}}, source="site.toml")
    return dataclasses.replace(site, path=tmp_path / f"{name}.toml")  # its audit log beside it (in tmp_path, not the working directory)


def global_weights(plan: TrainingPlan, n_features: int = 3):
    return get_weights(build_model(plan.model, plan.task, n_features, plan.model_options, seed=5))


def test_site_client_fit_sends_local_minus_global(tmp_path: Path) -> None:
    site = write_site(tmp_path)
    plan = plan_for(local_steps=15)
    glob = global_weights(plan)
    client = SiteClient(site)

    delta, n, metrics = client.fit([g.copy() for g in glob], {PLAN_KEY: plan.to_json(), ROUND_KEY: 1})

    # the same training done by hand
    data = load_for_plan(site, plan)
    model = build_model(plan.model, plan.task, 3, plan.model_options)
    set_weights(model, glob)
    expected_metrics = train(model, data, plan, 1)
    local = get_weights(model)
    assert len(delta) == len(glob)
    for d, loc, g in zip(delta, local, glob):
        assert d.shape == g.shape and d.dtype == np.float32
        np.testing.assert_array_equal(d, loc - g)
    assert l2_norm(delta) > 0
    assert n == data.n_train == 48  # 80 % of 60 rows
    assert metrics["site"] == "st-anne"
    assert metrics["train_loss"] == pytest.approx(expected_metrics["train_loss"])
    assert metrics["update_norm"] == pytest.approx(l2_norm(delta))
    assert set(metrics) == {"site", "train_loss", "update_norm"}


def test_site_client_round_changes_the_update(tmp_path: Path) -> None:
    site = write_site(tmp_path)
    plan = plan_for(local_steps=10)
    glob = global_weights(plan)
    client = SiteClient(site)
    d1, _, _ = client.fit(glob, {PLAN_KEY: plan.to_json(), ROUND_KEY: 1})
    d1_again, _, _ = client.fit(glob, {PLAN_KEY: plan.to_json(), ROUND_KEY: 1})
    d2, _, _ = client.fit(glob, {PLAN_KEY: plan.to_json(), ROUND_KEY: 2})
    assert all(np.array_equal(a, b) for a, b in zip(d1, d1_again))
    assert not all(np.array_equal(a, b) for a, b in zip(d1, d2))


def test_site_client_evaluate_reports_site_and_counts(tmp_path: Path) -> None:
    site = write_site(tmp_path)
    plan = plan_for()
    loss, n, metrics = SiteClient(site).evaluate(global_weights(plan), {PLAN_KEY: plan.to_json(), ROUND_KEY: 1})
    # 12 test rows: below MIN_TEST_FOR_COUNTS, the loss, RMSE and MAE (a label mean in disguise) stay at the site
    assert n == 12 and metrics["site"] == "st-anne" and loss == 0.0 and metrics["loss_withheld"] == 1
    assert "pearson_r" in metrics and not {"rmse", "mae"} & set(metrics)
    assert all(v is not None for v in metrics.values())


def test_site_client_refuses_to_send_a_diverged_update(tmp_path: Path) -> None:
    site = write_site(tmp_path, name="st-bart")
    plan = plan_for(learning_rate=1e30, local_steps=5)
    with pytest.raises(FedhelixError) as info:
        SiteClient(site).fit(global_weights(plan), {PLAN_KEY: plan.to_json(), ROUND_KEY: 3})
    message = str(info.value)
    assert "site 'st-bart'" in message
    assert "round 3" in message
    assert "nothing was sent" in message
    assert "learning_rate" in message
    assert "\n" not in message and message.startswith("fedhelix:")
