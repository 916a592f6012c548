"""Site-level (central) DP through Flower's own wrapper: sites clip whole updates, the coordinator adds noise."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from server.simulate import simulate
from server.strategy import site_level_noise
from shared.accounting import epsilon
from shared.config import load_study, parse_study
from shared.errors import ConfigError, FedhelixError

pytestmark = pytest.mark.e2e


def _weights(run: Path) -> np.ndarray:
    saved = torch.load(run / "model.pt", weights_only=False)
    return np.concatenate([t.numpy().ravel() for t in saved["state_dict"].values()])


def _wdbc(root: Path, tmp_path: Path, allow: bool) -> Path:
    """The WDBC study with sites that do (or do not) consent to site-level DP."""
    shutil.copytree(root / "studies" / "wdbc", tmp_path / "wdbc")
    for site in (tmp_path / "wdbc" / "sites").glob("*.toml"):
        text = site.read_text().replace("../../../data/wdbc", str(root / "data" / "wdbc"))
        site.write_text(text + f"allow_site_level = {str(allow).lower()}\n")
    return tmp_path / "wdbc" / "study.toml"


def _site_level(study_path: Path, target: float):
    base = load_study(study_path)
    privacy = dataclasses.replace(base.privacy, dp=True, level="site", target_epsilon=target, site_clipping_norm=0.05)
    return dataclasses.replace(base, rounds=1, privacy=privacy)


def test_site_level_dp_clips_each_site_and_adds_calibrated_noise(root: Path, tmp_path: Path) -> None:
    study = _site_level(_wdbc(root, tmp_path, allow=True), 8.0)
    noisy = simulate(study, tmp_path / "noisy", progress=False)
    simulate(_site_level(study.path, 1e7), tmp_path / "quiet", progress=False)  # same clipping, ~no noise

    sigma = site_level_noise(study)
    info = noisy["privacy"]["hospital_a"]
    assert info["level"] == "site" and info["noise_multiplier"] == pytest.approx(sigma)
    assert info["epsilon"] == pytest.approx(epsilon([(sigma, 1.0, 1)], study.privacy.delta), rel=1e-9)
    assert 0.95 * 8.0 <= info["epsilon"] <= 8.0
    for site in noisy["rounds"][0]["fit"]["sites"].values():
        # nothing about the un-noised update leaves in the clear: no loss, no clipping flag or count
        assert site["n"] == 1 and not {"site_update_clipped", "clipped_coordinates", "train_loss"} & set(site)
    assert noisy["secure_aggregation_params"]["max_weight"] == 1.0

    # Flower's wrapper adds N(0, (sigma * S / n_sites)^2) to every coordinate of the average.
    difference = _weights(tmp_path / "noisy") - _weights(tmp_path / "quiet")
    assert np.std(difference) == pytest.approx(sigma * 0.05 / 3, rel=0.15)


def test_a_site_that_has_not_consented_refuses_site_level_dp(root: Path, tmp_path: Path) -> None:
    study = _site_level(_wdbc(root, tmp_path, allow=False), 8.0)
    with pytest.raises(FedhelixError, match="allow_site_level"):
        simulate(study, tmp_path / "run", progress=False)


def test_site_level_dp_needs_fedavg_and_secure_aggregation() -> None:
    doc = {
        "study": {"name": "s", "task": "binary", "model": "logistic", "strategy": "fedadam"},
        "privacy": {"dp": True, "level": "site"},
        "sites": [{"name": "a", "config": "a.toml"}],
    }
    with pytest.raises(ConfigError, match='level = "site" needs strategy = "fedavg"'):
        parse_study(doc)
    doc["study"]["strategy"] = "fedavg"
    assert parse_study(doc).privacy.level == "site"
    doc["study"]["secure_aggregation"] = False
    with pytest.raises(ConfigError, match="un-noised update"):
        parse_study(doc)
