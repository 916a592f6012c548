"""Server checkpoints: atomic files, the study they belong to, strategy and RNG state."""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.client_manager import SimpleClientManager

from server.checkpoint import (
    CHECKPOINT_FILE,
    Checkpoint,
    CheckpointError,
    load_checkpoint,
    restore_rng,
    restore_strategy_state,
    rng_state,
    save_checkpoint,
    strategy_state,
    study_hash,
)
from server.recorder import RunRecorder, SiteInfo
from server.strategy import build_strategy
from shared.config import parse_study
from shared.plan import TrainingPlan

SITES = ("alpha", "beta", "gamma")


def study(tmp_path: Path, **kw):
    doc = {"study": {"name": "ckpt", "task": "binary", "model": "logistic", "rounds": 4, "strategy": "fedadam", "secure_aggregation": False, **kw}, "sites": [{"name": s, "config": f"{s}.toml"} for s in SITES]}
    return parse_study(doc, base_dir=tmp_path)


def weights(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(1, 4)).astype(np.float32), rng.normal(size=(1,)).astype(np.float32)]


class Proxy:
    def __init__(self, node_id: int) -> None:
        self.node_id = node_id
        self.cid = str(node_id)


def fedadam_after_rounds(tmp_path: Path, cfg, rounds: range, start: list[np.ndarray], state: dict | None = None):
    """Run FedAdam over fixed deltas for ``rounds``; return the final global and the strategy."""
    plan = TrainingPlan.from_study(cfg, ["a", "b", "c", "d"])
    recorder = RunRecorder(tmp_path / f"run{rounds.start}", cfg.task)
    recorder.set_sites([SiteInfo(100 + i, s, 10, 5, ["a", "b", "c", "d"], order=i) for i, s in enumerate(SITES)])
    strategy = build_strategy(cfg, plan, start, recorder)
    if state:
        restore_strategy_state(strategy, state)
    manager = SimpleClientManager()
    proxies = [Proxy(100 + i) for i in range(3)]
    for p in proxies:
        manager.register(p)
    glob = start
    for rnd in rounds:
        strategy.configure_fit(rnd, ndarrays_to_parameters(glob), manager)
        deltas = [[w * 0.1 for w in weights(rnd * 10 + i)] for i in range(3)]
        results = [(p, FitRes(Status(Code.OK, ""), ndarrays_to_parameters(d), 10 * (i + 1), {"site": SITES[i]})) for i, (p, d) in enumerate(zip(proxies, deltas))]
        glob = parameters_to_ndarrays(strategy.aggregate_fit(rnd, results, [])[0])
    return glob, strategy


def test_fedadam_resumed_from_a_checkpoint_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    cfg = study(tmp_path)
    straight, _ = fedadam_after_rounds(tmp_path, cfg, range(1, 5), weights())
    half, strategy = fedadam_after_rounds(tmp_path, cfg, range(1, 3), weights())
    state = strategy_state(strategy)
    assert set(state) == {"current_weights", "m_t", "v_t"}
    save_checkpoint(tmp_path, Checkpoint("ckpt", study_hash(cfg), 2, half, state))
    ckpt = load_checkpoint(tmp_path, cfg)
    resumed, _ = fedadam_after_rounds(tmp_path, cfg, range(3, 5), ckpt.weights, ckpt.strategy_state)
    for a, b in zip(straight, resumed):
        np.testing.assert_array_equal(a, b)
    # Without the moments the result differs: the state really matters.
    fresh, _ = fedadam_after_rounds(tmp_path, cfg, range(3, 5), ckpt.weights)
    assert not all(np.array_equal(a, b) for a, b in zip(straight, fresh))


def test_checkpoint_round_trip_keeps_everything(tmp_path: Path) -> None:
    cfg = study(tmp_path)
    rounds = [{"round": 1, "evaluate": {"mean": {"roc_auc": 0.7}}}]
    ckpt = Checkpoint("ckpt", study_hash(cfg), 1, [w.astype(np.float64) for w in weights()], {"m_t": weights(3)}, rounds, [{"round": 1, "site": "beta", "reason": "x"}], ["a", "b"], {"mean": [0.5], "scale": [2.0]}, rng_state())
    save_checkpoint(tmp_path, ckpt)
    back = load_checkpoint(tmp_path, cfg)
    assert back.round == 1 and back.rounds == rounds and back.failures == ckpt.failures and back.features == ["a", "b"]
    assert back.normalization == {"mean": [0.5], "scale": [2.0]}
    assert [w.dtype for w in back.weights] == [np.float64, np.float64]  # dtypes kept, so resumed sums are identical
    np.testing.assert_array_equal(back.strategy_state["m_t"][0], weights(3)[0])
    assert not list(tmp_path.glob(".*.tmp"))  # the temporary file was renamed into place


def test_rng_state_restores_python_numpy_and_torch(tmp_path: Path) -> None:
    state = rng_state()
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    save_checkpoint(tmp_path, Checkpoint("ckpt", study_hash(study(tmp_path)), 1, weights(), rng=state))
    random.random(), np.random.rand(), torch.rand(1)
    restore_rng(load_checkpoint(tmp_path, study(tmp_path)).rng)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_checkpoint_of_another_study_is_refused_in_one_line(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, Checkpoint("ckpt", study_hash(study(tmp_path)), 2, weights()))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path, study(tmp_path, learning_rate=0.5))
    message = str(info.value)
    assert "belongs to study 'ckpt'" in message and "\n" not in message


def test_study_hash_ignores_file_locations_but_not_settings(tmp_path: Path) -> None:
    a, b = study(tmp_path / "x"), study(tmp_path / "y")
    assert study_hash(a) == study_hash(b)
    assert study_hash(dataclasses.replace(a, path=tmp_path / "s.toml")) == study_hash(a)
    assert study_hash(study(tmp_path, seed=1)) != study_hash(a)


def test_missing_or_corrupt_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path, study(tmp_path))
    (tmp_path / CHECKPOINT_FILE).write_bytes(b"half a file")
    with pytest.raises(CheckpointError, match="unreadable"):
        load_checkpoint(tmp_path, study(tmp_path))
