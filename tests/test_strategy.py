"""Delta strategies: validation of each update, then Flower's own aggregation over ``global + delta``."""

from __future__ import annotations

import dataclasses

import json
from pathlib import Path

import numpy as np
import pytest
from flwr.common import Code, EvaluateRes, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.client_manager import SimpleClientManager
from flwr.server.strategy import FedAdam

from server.recorder import RunRecorder, SiteInfo
from server.strategy import StudyAborted, build_strategy, check_delta
from shared.config import parse_study
from shared.plan import PLAN_KEY, ROUND_KEY, TrainingPlan

SITES = ("alpha", "beta", "gamma")
OK = Status(code=Code.OK, message="ok")


class Proxy:
    """Stand-in for a ClientProxy: the strategy reads ``node_id``, the client manager ``cid``."""

    def __init__(self, node_id: int) -> None:
        self.node_id = node_id
        self.cid = str(node_id)


def make_study(tmp_path: Path, robustness: dict | None = None, **study):
    doc = {
        "study": {"name": "unit", "task": "binary", "model": "logistic", "rounds": 3, "seed": 7, **study},
        "sites": [{"name": name, "config": f"sites/{name}.toml"} for name in SITES],
    }
    if robustness is not None:
        doc["robustness"] = robustness
    return parse_study(doc, base_dir=tmp_path)


def initial_weights() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.normal(size=(1, 4)).astype(np.float32), rng.normal(size=(1,)).astype(np.float32)]


def make_deltas(seed: int = 1, scale: float = 0.1) -> list[list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [[(scale * rng.normal(size=w.shape)).astype(np.float32) for w in initial_weights()] for _ in SITES]


def fit_res(arrays: list[np.ndarray], n: int, site: str | None, **metrics) -> FitRes:
    if site is not None:
        metrics["site"] = site
    return FitRes(status=OK, parameters=ndarrays_to_parameters(arrays), num_examples=n, metrics=metrics)


def setup(tmp_path: Path, **study):
    """Strategy + recorder + a client manager holding the three sites; configure_fit sets the global."""
    study_cfg = make_study(tmp_path, **study)
    plan = TrainingPlan.from_study(study_cfg, ["a", "b", "c", "d"])
    recorder = RunRecorder(tmp_path / "run", study_cfg.task)
    recorder.set_sites([SiteInfo(node_id=100 + i, name=name, n_train=10 * (i + 1), n_test=5 * (i + 1), features=["a", "b", "c", "d"], order=i) for i, name in enumerate(SITES)])
    strategy = build_strategy(study_cfg, plan, initial_weights(), recorder)
    manager, proxies = registered(range(100, 100 + len(SITES)))
    return strategy, recorder, manager, proxies, plan


def registered(node_ids) -> tuple[SimpleClientManager, list[Proxy]]:
    """A client manager holding one proxy per node id."""
    manager = SimpleClientManager()
    proxies = [Proxy(node_id) for node_id in node_ids]
    for proxy in proxies:
        manager.register(proxy)
    return manager, proxies


def configure(strategy, manager, server_round: int, weights: list[np.ndarray]):
    instructions = strategy.configure_fit(server_round, ndarrays_to_parameters(weights), manager)
    return instructions


# ----------------------------------------------------------------------------- configure_fit


def test_configure_fit_sends_plan_and_round_to_every_site(tmp_path: Path) -> None:
    strategy, _, manager, proxies, plan = setup(tmp_path)
    instructions = configure(strategy, manager, 2, initial_weights())
    assert {p.node_id for p, _ in instructions} == {p.node_id for p in proxies}
    for _, ins in instructions:
        assert ins.config[ROUND_KEY] == 2
        assert TrainingPlan.from_json(str(ins.config[PLAN_KEY])) == plan


# ----------------------------------------------------------------------------- (a) FedAvg


def test_fedavg_over_deltas_is_global_plus_weighted_mean_delta(tmp_path: Path) -> None:
    strategy, recorder, manager, proxies, _ = setup(tmp_path)
    glob = initial_weights()
    configure(strategy, manager, 1, glob)
    deltas = make_deltas()
    counts = [10, 30, 60]
    results = [(p, fit_res(d, n, s, train_loss=0.5)) for p, d, n, s in zip(proxies, deltas, counts, SITES)]

    params, _ = strategy.aggregate_fit(1, results, [])

    got = parameters_to_ndarrays(params)
    w = np.array(counts, dtype=np.float64) / sum(counts)
    for i, g in enumerate(glob):
        mean_delta = sum(wk * deltas[k][i].astype(np.float64) for k, wk in enumerate(w))
        np.testing.assert_allclose(got[i], g.astype(np.float64) + mean_delta, rtol=0, atol=1e-6)
    # not the unweighted mean: the weights matter
    unweighted = glob[0] + np.mean([d[0] for d in deltas], axis=0)
    assert not np.allclose(got[0], unweighted, atol=1e-4)
    fit = recorder._current["fit"]
    assert set(fit["sites"]) == set(SITES) and fit["rejected"] == {}
    assert fit["sites"]["beta"]["n"] == 30 and fit["sites"]["beta"]["train_loss"] == 0.5


def test_site_name_falls_back_to_handshake_name_by_node_id(tmp_path: Path) -> None:
    strategy, recorder, manager, proxies, _ = setup(tmp_path)
    configure(strategy, manager, 1, initial_weights())
    deltas = make_deltas()
    results = [(p, fit_res(d, 10, None)) for p, d in zip(proxies, deltas)]
    strategy.aggregate_fit(1, results, [])
    assert set(recorder._current["fit"]["sites"]) == set(SITES)


# ----------------------------------------------------------------------------- (b) FedAdam


def test_fedadam_over_deltas_matches_flowers_fedadam_on_full_weights(tmp_path: Path) -> None:
    strategy, _, manager, proxies, _ = setup(tmp_path, strategy="fedadam", server_learning_rate=0.05, learning_rate=0.01)
    assert isinstance(strategy, FedAdam)
    reference = FedAdam(
        initial_parameters=ndarrays_to_parameters(initial_weights()),
        eta=0.05,
        eta_l=0.01,
        fraction_fit=1.0,
        min_fit_clients=3,
        min_available_clients=3,
        accept_failures=True,
    )
    counts = [10, 30, 60]
    glob_delta = initial_weights()
    glob_ref = initial_weights()
    for server_round in (1, 2, 3):  # several rounds: Adam's moment state must match too
        deltas = make_deltas(seed=server_round)
        configure(strategy, manager, server_round, glob_delta)
        ours = strategy.aggregate_fit(server_round, [(p, fit_res(d, n, s)) for p, d, n, s in zip(proxies, deltas, counts, SITES)], [])[0]
        full = [[g + dd for g, dd in zip(glob_ref, d)] for d in deltas]
        theirs = reference.aggregate_fit(server_round, [(p, fit_res(f, n, s)) for p, f, n, s in zip(proxies, full, counts, SITES)], [])[0]
        glob_delta, glob_ref = parameters_to_ndarrays(ours), parameters_to_ndarrays(theirs)
        for a, b in zip(glob_delta, glob_ref):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    # the server actually moved away from the start
    assert not np.allclose(glob_delta[0], initial_weights()[0], atol=1e-3)


# ----------------------------------------------------------------------------- (c) rejection


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        (lambda d: [np.where(np.arange(d[0].size).reshape(d[0].shape) == 2, np.nan, d[0]).astype(np.float32), d[1]], "NaN or Inf"),
        (lambda d: [d[0], np.array([np.inf], dtype=np.float32)], "NaN or Inf"),
        (lambda d: [np.zeros((4, 1), dtype=np.float32), d[1]], "shape"),
        (lambda d: [d[0], np.array([1], dtype=np.int64)], "dtype"),
        (lambda d: [d[0]], "number of tensors"),
    ],
    ids=["nan", "inf", "shape", "int-dtype", "missing-tensor"],
)
def test_bad_update_is_rejected_recorded_and_left_out(tmp_path: Path, bad, reason: str) -> None:
    strategy, recorder, manager, proxies, _ = setup(tmp_path, min_sites=2, secure_aggregation=False)
    glob = initial_weights()
    configure(strategy, manager, 1, glob)
    deltas = make_deltas()
    counts = [10, 30, 60]
    results = [(p, fit_res(d, n, s)) for p, d, n, s in zip(proxies, deltas, counts, SITES)]
    results[1] = (proxies[1], fit_res(bad(deltas[1]), counts[1], "beta"))

    params, _ = strategy.aggregate_fit(1, results, [])

    got = parameters_to_ndarrays(params)
    w = np.array([10, 60], dtype=np.float64) / 70
    for i, g in enumerate(glob):
        expected = g + w[0] * deltas[0][i] + w[1] * deltas[2][i]
        np.testing.assert_allclose(got[i], expected, atol=1e-6)
        assert np.isfinite(got[i]).all()
    assert [(f["round"], f["site"], f["phase"]) for f in recorder.failures] == [(1, "beta", "train")]
    assert reason in recorder.failures[0]["reason"]
    fit = recorder._current["fit"]
    assert list(fit["rejected"]) == ["beta"] and reason in fit["rejected"]["beta"]
    assert set(fit["sites"]) == {"alpha", "gamma"}
    # the rejection also reaches the round's entry once evaluation is recorded
    strategy.aggregate_evaluate(1, [(p, EvaluateRes(status=OK, loss=0.3, num_examples=5, metrics={"site": s, "roc_auc": 0.7})) for p, s in zip(proxies, SITES)], [])
    assert recorder.rounds[-1]["fit"]["rejected"] == fit["rejected"]
    assert [f["site"] for f in recorder.rounds[-1]["failures"]] == ["beta"]


def test_several_bad_updates_in_one_round_each_get_their_reason(tmp_path: Path) -> None:
    strategy, recorder, manager, proxies, _ = setup(tmp_path, min_sites=1, secure_aggregation=False)
    glob = initial_weights()
    configure(strategy, manager, 1, glob)
    deltas = make_deltas()
    nan = [np.full_like(deltas[0][0], np.nan), deltas[0][1]]
    integer = [deltas[1][0].astype(np.int32), deltas[1][1]]
    results = [(proxies[0], fit_res(nan, 10, "alpha")), (proxies[1], fit_res(integer, 30, "beta")), (proxies[2], fit_res(deltas[2], 60, "gamma"))]
    got = parameters_to_ndarrays(strategy.aggregate_fit(1, results, [])[0])
    for g, d, out in zip(glob, deltas[2], got):
        np.testing.assert_allclose(out, g + d, atol=1e-7)
    reasons = {f["site"]: f["reason"] for f in recorder.failures}
    assert set(reasons) == {"alpha", "beta"}
    assert "NaN or Inf" in reasons["alpha"] and "int32" in reasons["beta"]


# ----------------------------------------------------------------------------- (d) abort


def test_too_few_valid_updates_abort_the_study_naming_the_sites(tmp_path: Path) -> None:
    strategy, recorder, manager, proxies, _ = setup(tmp_path)  # every site required
    configure(strategy, manager, 3, initial_weights())
    deltas = make_deltas()
    deltas[2] = [np.full_like(deltas[2][0], np.inf), deltas[2][1]]
    results = [(p, fit_res(d, 10, s)) for p, d, s in zip(proxies, deltas, SITES)]
    with pytest.raises(StudyAborted) as info:
        strategy.aggregate_fit(3, results, [])
    message = str(info.value)
    assert "round 3" in message and "2 of the 3" in message
    assert "gamma" in message and "NaN or Inf" in message
    assert "alpha" not in message and "beta" not in message


def test_abort_message_includes_sites_that_replied_with_an_error(tmp_path: Path) -> None:
    strategy, recorder, manager, proxies, _ = setup(tmp_path, min_sites=2, secure_aggregation=False)
    configure(strategy, manager, 1, initial_weights())
    # beta's ClientApp raised: the grid tap reported it before aggregation
    recorder.observe_reply("train", 1, 101, "Exception ... fedhelix: site 'beta': training diverged in round 1'>")
    deltas = make_deltas()
    results = [(proxies[0], fit_res(deltas[0], 10, "alpha")), (proxies[2], fit_res([deltas[2][0].astype(np.int8), deltas[2][1]], 10, "gamma"))]
    with pytest.raises(StudyAborted) as info:
        strategy.aggregate_fit(1, results, [RuntimeError("beta failed")])
    message = str(info.value)
    assert "1 of the 2" in message
    assert "beta: site 'beta': training diverged in round 1" in message
    assert "gamma: update rejected" in message


def test_failures_of_earlier_rounds_are_not_blamed(tmp_path: Path) -> None:
    strategy, recorder, manager, proxies, _ = setup(tmp_path)
    recorder.observe_reply("train", 1, 100, "fedhelix: old problem")
    configure(strategy, manager, 2, initial_weights())
    with pytest.raises(StudyAborted) as info:
        strategy.aggregate_fit(2, [], [])
    assert "0 of the 3" in str(info.value) and "old problem" not in str(info.value)
    assert "no reason given" in str(info.value)


def test_enough_sites_with_min_sites_proceeds(tmp_path: Path) -> None:
    strategy, _, manager, proxies, _ = setup(tmp_path, min_sites=2, secure_aggregation=False)
    glob = initial_weights()
    configure(strategy, manager, 1, glob)
    deltas = make_deltas()
    got = parameters_to_ndarrays(strategy.aggregate_fit(1, [(proxies[0], fit_res(deltas[0], 1, "alpha")), (proxies[1], fit_res(deltas[1], 3, "beta"))], [RuntimeError("gamma down")])[0])
    np.testing.assert_allclose(got[0], glob[0] + 0.25 * deltas[0][0] + 0.75 * deltas[1][0], atol=1e-6)


# ----------------------------------------------------------------------------- (e) check_delta


def test_check_delta_accepts_matching_float_arrays() -> None:
    ref = initial_weights()
    assert check_delta([np.zeros_like(r) for r in ref], ref) is None
    # float64 and float16 are floating point too
    assert check_delta([r.astype(np.float64) for r in ref], ref) is None
    assert check_delta([r.astype(np.float16) for r in ref], ref) is None
    assert check_delta([], []) is None


@pytest.mark.parametrize(
    ("delta", "expected"),
    [
        ([np.zeros((1, 4), np.float32)], "wrong number of tensors (1, expected 2)"),
        ([np.zeros((1, 4), np.float32), np.zeros(1, np.float32), np.zeros(1, np.float32)], "wrong number of tensors (3, expected 2)"),
        ([np.zeros((4,), np.float32), np.zeros(1, np.float32)], "tensor 0 has shape (4,), expected (1, 4)"),
        ([np.zeros((1, 4), np.float32), np.zeros((), np.float32)], "tensor 1 has shape (), expected (1,)"),
        ([np.zeros((1, 4), np.int64), np.zeros(1, np.float32)], "tensor 0 has dtype int64, expected floating point"),
        ([np.zeros((1, 4), np.float32), np.zeros(1, bool)], "tensor 1 has dtype bool, expected floating point"),
        ([np.zeros((1, 4), np.complex64), np.zeros(1, np.float32)], "tensor 0 has dtype complex64, expected floating point"),
        ([np.zeros((1, 4), np.float32), np.array([np.nan], np.float32)], "tensor 1 contains NaN or Inf"),
        ([np.array([[0, 0, -np.inf, 0]], np.float64), np.zeros(1, np.float32)], "tensor 0 contains NaN or Inf"),
    ],
)
def test_check_delta_reasons(delta, expected: str) -> None:
    assert check_delta(delta, initial_weights()) == expected


def test_check_delta_reports_the_first_problem_only() -> None:
    ref = initial_weights()
    # shape is checked before dtype and values
    assert check_delta([np.full((2, 2), np.nan, np.float32), ref[1]], ref).startswith("tensor 0 has shape")


# ----------------------------------------------------------------------------- (f) evaluate


def test_aggregate_evaluate_records_sites_and_summaries(tmp_path: Path) -> None:
    strategy, recorder, manager, proxies, _ = setup(tmp_path)
    configure(strategy, manager, 1, initial_weights())
    strategy.aggregate_fit(1, [(p, fit_res(d, 10, s, train_loss=0.4)) for p, d, s in zip(proxies, make_deltas(), SITES)], [])
    # n_test from the handshake: alpha 5, beta 10, gamma 15
    results = [
        (proxies[2], EvaluateRes(status=OK, loss=0.9, num_examples=15, metrics={"site": "gamma", "roc_auc": 0.9, "accuracy": 0.8})),
        (proxies[0], EvaluateRes(status=OK, loss=0.3, num_examples=5, metrics={"site": "alpha", "roc_auc": 0.6, "accuracy": 0.5})),
        (proxies[1], EvaluateRes(status=OK, loss=0.6, num_examples=10, metrics={"roc_auc": 0.75})),  # no site: by node id
    ]

    loss, _ = strategy.aggregate_evaluate(1, results, [])

    assert loss == pytest.approx((0.9 * 15 + 0.3 * 5 + 0.6 * 10) / 30)
    entry = recorder.rounds[-1]
    assert entry["round"] == 1
    ev = entry["evaluate"]
    assert list(ev["sites"]) == ["alpha", "beta", "gamma"]  # study order, not arrival order
    assert ev["sites"]["alpha"] == {"roc_auc": 0.6, "accuracy": 0.5, "loss": 0.3, "n": 5}
    assert "site" not in ev["sites"]["gamma"]
    assert ev["mean"]["roc_auc"] == pytest.approx((0.6 + 0.75 + 0.9) / 3)
    assert ev["weighted"]["roc_auc"] == pytest.approx((0.6 * 5 + 0.75 * 10 + 0.9 * 15) / 30)
    assert ev["mean"]["accuracy"] == pytest.approx(0.65)  # only the sites that report it
    assert ev["weighted"]["accuracy"] == pytest.approx((0.5 * 5 + 0.8 * 15) / 20)
    assert ev["mean"]["loss"] == pytest.approx(0.6)
    assert "n" not in ev["mean"]
    assert entry["fit"]["sites"]["alpha"]["train_loss"] == 0.4  # fit and evaluate land in one round entry

    lines = recorder.metrics_path.read_text().splitlines()
    assert len(lines) == 1
    assert json.loads(lines[0]) == json.loads(json.dumps(entry))

    strategy.aggregate_evaluate(2, results, [])
    lines = recorder.metrics_path.read_text().splitlines()
    assert [json.loads(line)["round"] for line in lines] == [1, 2]
    assert "fit" not in json.loads(lines[1])  # round 2 had no fit recorded


def test_update_that_overflows_the_global_dtype_is_rejected(tmp_path: Path) -> None:
    strategy, recorder, manager, proxies, _ = setup(tmp_path, min_sites=2, secure_aggregation=False)
    glob = initial_weights()
    configure(strategy, manager, 1, glob)
    deltas = make_deltas()
    deltas[0] = [np.full((1, 4), 1e300, dtype=np.float64), deltas[0][1]]  # finite, but inf as float32
    got = parameters_to_ndarrays(strategy.aggregate_fit(1, [(p, fit_res(d, 10, s)) for p, d, s in zip(proxies, deltas, SITES)], [])[0])
    assert [f["site"] for f in recorder.failures] == ["alpha"]
    assert all(g.dtype == np.float32 and np.isfinite(g).all() for g in got)


# ----------------------------------------------------------------------------- robustness


def test_update_above_the_norm_bound_is_rejected_and_the_rest_aggregated(tmp_path: Path) -> None:
    strategy, recorder, manager, proxies, _ = setup(tmp_path, min_sites=2, secure_aggregation=False, robustness={"max_update_norm": 1.0})
    glob = initial_weights()
    configure(strategy, manager, 1, glob)
    deltas = make_deltas()
    deltas[2] = [d * 1000 for d in deltas[2]]
    got = parameters_to_ndarrays(strategy.aggregate_fit(1, [(p, fit_res(d, 10, s)) for p, d, s in zip(proxies, deltas, SITES)], [])[0])
    np.testing.assert_allclose(got[0], glob[0] + 0.5 * (deltas[0][0] + deltas[1][0]), atol=1e-6)
    assert [(f["site"], f["kind"]) for f in recorder.failures] == [("gamma", "rejected")]
    assert "exceeds the study's max_update_norm 1" in recorder.failures[0]["reason"]


def test_norm_bound_is_not_applied_to_the_secure_aggregate(tmp_path: Path) -> None:
    study_cfg = make_study(tmp_path)  # secure aggregation on: the server sees only the sum
    assert build_strategy(study_cfg, TrainingPlan.from_study(study_cfg), initial_weights(), RunRecorder(tmp_path / "r", "binary")).max_update_norm is None


def robust(tmp_path: Path, strategy: str, **robustness):
    doc = {
        "study": {"name": "unit", "task": "binary", "model": "logistic", "rounds": 3, "seed": 7, "strategy": strategy, "secure_aggregation": False},
        "robustness": robustness,
        "sites": [{"name": f"s{i}", "config": f"s{i}.toml"} for i in range(5)],
    }
    cfg = parse_study(doc, base_dir=tmp_path)
    strategy_obj = build_strategy(cfg, TrainingPlan.from_study(cfg), initial_weights(), RunRecorder(tmp_path / strategy, "binary"))
    manager, proxies = registered(range(200, 205))
    glob = initial_weights()
    configure(strategy_obj, manager, 1, glob)
    rng = np.random.default_rng(3)
    honest = [[(0.1 + 0.01 * rng.normal(size=w.shape)).astype(np.float32) for w in glob] for _ in range(4)]
    attacker = [np.full_like(w, 50.0) for w in glob]  # finite, so only the aggregation rule can stop it
    deltas = [*honest, attacker]
    results = [(p, fit_res(d, 10 * (i + 1), f"s{i}")) for i, (p, d) in enumerate(zip(proxies, deltas))]
    return glob, deltas, parameters_to_ndarrays(strategy_obj.aggregate_fit(1, results, [])[0])


def test_median_is_the_coordinate_wise_median_of_the_sites_models(tmp_path: Path) -> None:
    glob, deltas, got = robust(tmp_path, "median")
    for i, g in enumerate(glob):
        np.testing.assert_allclose(got[i], np.median([g + d[i] for d in deltas], axis=0), atol=1e-6)
        assert np.abs(got[i] - g).max() < 0.2  # the attacker's 50 did not move it


def test_trimmed_mean_cuts_the_extremes(tmp_path: Path) -> None:
    glob, deltas, got = robust(tmp_path, "trimmed_mean", trim_fraction=0.2)
    for i, g in enumerate(glob):
        models = np.sort(np.stack([g + d[i] for d in deltas]), axis=0)
        np.testing.assert_allclose(got[i], models[1:4].mean(axis=0), atol=1e-6)


def test_krum_picks_an_honest_site(tmp_path: Path) -> None:
    glob, deltas, got = robust(tmp_path, "krum", byzantine_sites=1)
    chosen = [j for j in range(4) if all(np.allclose(got[i], glob[i] + deltas[j][i], atol=1e-6) for i in range(len(glob)))]
    assert len(chosen) == 1


def test_a_study_that_releases_no_evaluation_asks_no_site_and_still_closes_the_round(tmp_path: Path) -> None:
    study = make_study(tmp_path)
    study = dataclasses.replace(study, privacy=dataclasses.replace(study.privacy, evaluation=False))
    recorder = RunRecorder(tmp_path / "run", study.task)
    recorder.set_sites([SiteInfo(node_id=100 + i, name=name, n_train=10, n_test=5, features=["a", "b", "c", "d"], order=i) for i, name in enumerate(SITES)])
    strategy = build_strategy(study, TrainingPlan.from_study(study, ["a", "b", "c", "d"]), initial_weights(), recorder)
    manager, _ = registered(range(100, 100 + len(SITES)))
    assert strategy.configure_evaluate(1, ndarrays_to_parameters(initial_weights()), manager) == []
    assert [r["round"] for r in recorder.rounds] == [1] and recorder.rounds[0]["evaluate"]["sites"] == {}
    honest = build_strategy(make_study(tmp_path), TrainingPlan.from_study(make_study(tmp_path), ["a", "b", "c", "d"]), initial_weights(), recorder)
    assert len(honest.configure_evaluate(1, ndarrays_to_parameters(initial_weights()), manager)) == len(SITES)


def test_a_site_that_withholds_its_loss_is_left_out_of_the_loss_and_recorded_without_one(tmp_path: Path) -> None:
    strategy, recorder, manager, proxies, _ = setup(tmp_path)
    configure(strategy, manager, 1, initial_weights())
    strategy.aggregate_fit(1, [(p, fit_res(d, 10, s, train_loss=0.4)) for p, d, s in zip(proxies, make_deltas(), SITES)], [])
    results = [
        (proxies[0], EvaluateRes(status=OK, loss=0.0, num_examples=5, metrics={"site": "alpha", "roc_auc": 0.6, "loss_withheld": 1})),
        (proxies[1], EvaluateRes(status=OK, loss=0.6, num_examples=10, metrics={"site": "beta", "roc_auc": 0.75})),
        (proxies[2], EvaluateRes(status=OK, loss=0.9, num_examples=15, metrics={"site": "gamma", "roc_auc": 0.9})),
    ]
    loss, _ = strategy.aggregate_evaluate(1, results, [])
    assert loss == pytest.approx((0.6 * 10 + 0.9 * 15) / 25)  # the placeholder 0.0 does not pull the mean down
    sites = recorder.rounds[-1]["evaluate"]["sites"]
    assert sites["alpha"] == {"roc_auc": 0.6, "loss": None, "n": 5}
    assert recorder.rounds[-1]["evaluate"]["mean"]["loss"] == pytest.approx((0.6 + 0.9) / 2)
