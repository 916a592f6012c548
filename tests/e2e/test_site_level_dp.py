"""Site-level (central) DP through Flower's own wrapper: sites clip whole updates, the coordinator adds noise."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from server.simulate import simulate
from server.strategy import site_level_noise
from shared.accounting import epsilon
from shared.config import load_study, parse_study
from shared.errors import ConfigError

pytestmark = pytest.mark.e2e


def _weights(run: Path) -> np.ndarray:
    saved = torch.load(run / "model.pt", weights_only=False)
    return np.concatenate([t.numpy().ravel() for t in saved["state_dict"].values()])


def test_site_level_dp_clips_each_site_and_adds_calibrated_noise(root: Path, tmp_path: Path) -> None:
    base = load_study(root / "studies" / "wdbc" / "study.toml")
    privacy = dataclasses.replace(base.privacy, dp=True, level="site", target_epsilon=8.0, site_clipping_norm=0.05)
    study = dataclasses.replace(base, rounds=1, secure=dataclasses.replace(base.secure, enabled=False), privacy=privacy)

    noisy = simulate(study, tmp_path / "noisy", progress=False)
    quiet_study = dataclasses.replace(study, privacy=dataclasses.replace(privacy, target_epsilon=1e7))
    simulate(quiet_study, tmp_path / "quiet", progress=False)

    sigma = site_level_noise(study)
    info = noisy["privacy"]["hospital_a"]
    assert info["level"] == "site" and info["noise_multiplier"] == pytest.approx(sigma)
    assert info["epsilon"] == pytest.approx(epsilon([(sigma, 1.0, 1)], privacy.delta), rel=1e-9)
    assert 0.95 * 8.0 <= info["epsilon"] <= 8.0
    for site in noisy["rounds"][0]["fit"]["sites"].values():
        assert site["update_norm"] <= 0.05 + 1e-6 and site["n"] == 1  # clipped, unweighted

    # Flower's wrapper adds N(0, (sigma * S / n_sites)^2) to every coordinate of the average.
    difference = _weights(tmp_path / "noisy") - _weights(tmp_path / "quiet")
    expected = sigma * 0.05 / 3
    assert np.std(difference) == pytest.approx(expected, rel=0.15)


def test_site_level_dp_needs_fedavg() -> None:
    doc = {
        "study": {"name": "s", "task": "binary", "model": "logistic", "strategy": "fedadam"},
        "privacy": {"dp": True, "level": "site"},
        "sites": [{"name": "a", "config": "a.toml"}],
    }
    with pytest.raises(ConfigError, match='level = "site" needs strategy = "fedavg"'):
        parse_study(doc)
    doc["study"]["strategy"] = "fedavg"
    assert parse_study(doc).privacy.level == "site"
