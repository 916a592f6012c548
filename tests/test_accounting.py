"""Privacy accounting: calibrated noise lands just under the target, and a round's DP plan is stable."""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import pytest

from client.privacy import budget
from opacus.accountants import PRVAccountant, RDPAccountant

from shared.accounting import calibrate_noise, compose, epsilon
from client.privacy.budget import plan_dp_round
from shared.config import DataSpec, ModelOptions, PrivacyConfig, SiteConfig, SitePrivacy
from shared.errors import ConfigError
from shared.plan import TrainingPlan

DELTA = 1e-5


@pytest.fixture(autouse=True)
def _quiet_opacus():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Opacus warns about optimal orders at the grid's edge
        yield


# ----------------------------------------------------------------------------- calibrate_noise / epsilon


@pytest.mark.parametrize(
    ("accountant", "target", "q", "steps"),
    [
        ("rdp", 1.0, 0.1, 50),
        ("rdp", 3.0, 0.01, 100),
        ("rdp", 8.0, 1.0, 20),  # full batch: no amplification by subsampling
        ("prv", 1.0, 0.1, 100),
    ],
)
def test_calibrated_noise_lands_just_under_the_target(accountant: str, target: float, q: float, steps: int) -> None:
    sigma = calibrate_noise(target, DELTA, q, steps, accountant)
    assert sigma > 0
    spent = epsilon([(sigma, q, steps)], DELTA, accountant)
    assert 0.95 * target <= spent <= target
    # a little less noise would overshoot: the calibration is not wastefully loose
    assert epsilon([(sigma * 0.97, q, steps)], DELTA, accountant) > spent


def test_more_privacy_needs_more_noise() -> None:
    loose = calibrate_noise(8.0, DELTA, 1.0, 10)
    tight = calibrate_noise(1.0, DELTA, 1.0, 10)
    longer = calibrate_noise(8.0, DELTA, 1.0, 40)
    assert tight > loose and longer > loose


def test_epsilon_is_monotone_in_steps_and_zero_for_no_history() -> None:
    assert epsilon([], DELTA) == 0.0
    assert epsilon([], DELTA, "prv") == 0.0
    values = [epsilon([(2.0, 0.05, steps)], DELTA) for steps in (1, 10, 50, 200, 1000)]
    assert all(v > 0 for v in values)
    assert all(a < b for a, b in zip(values, values[1:]))


def test_epsilon_composes_a_history_like_its_total_steps() -> None:
    """Same mechanism split over entries composes exactly like one entry with all the steps (RDP adds)."""
    split = epsilon([(2.0, 0.05, 30), (2.0, 0.05, 70)], DELTA)
    whole = epsilon([(2.0, 0.05, 100)], DELTA)
    assert split == pytest.approx(whole, rel=1e-9)
    assert epsilon([(2.0, 0.05, 30), (3.0, 0.1, 70)], DELTA) > epsilon([(2.0, 0.05, 30)], DELTA)


def test_smaller_delta_costs_more_epsilon() -> None:
    assert epsilon([(2.0, 0.05, 100)], 1e-7) > epsilon([(2.0, 0.05, 100)], 1e-5)


# ----------------------------------------------------------------------------- plan_dp_round


def plan_for(**kw) -> TrainingPlan:
    base = dict(
        study="dp-unit",
        task="binary",
        model="logistic",
        local_steps=10,
        batch_size=10,
        learning_rate=0.1,
        optimizer="sgd",
        proximal_mu=0.0,
        seed=1,
        model_options=ModelOptions(),
        privacy=PrivacyConfig(dp=True, target_epsilon=1.0, delta=1e-5, max_grad_norm=0.8),
        rounds=5,
    )
    base.update(kw)
    return TrainingPlan(**base)


def site_for(name: str = "st-luke", delta: float = 1e-5, with_privacy: bool = True) -> SiteConfig:
    privacy = SitePrivacy(Path(f"/nonexistent/{name}.ledger.sqlite"), 10.0, delta) if with_privacy else None
    return SiteConfig(name, DataSpec(Path("/nonexistent/data.csv"), "y"), privacy=privacy)


def test_plan_dp_round_calibrates_rounds_times_local_steps() -> None:
    plan = plan_for()
    dp = plan_dp_round(plan, site_for(), n_train=100)
    assert dp.sample_rate == pytest.approx(0.1)
    assert dp.steps == plan.local_steps == 10  # one round's steps
    assert dp.delta == 1e-5 and dp.max_grad_norm == 0.8 and dp.accountant == "rdp"
    assert dp.step == (dp.noise_multiplier, 0.1, 10)
    # all planned rounds together land at the study's target, just under it
    total = epsilon([dp.step] * plan.rounds, dp.delta)
    assert 0.95 <= total <= 1.0
    assert epsilon([dp.step], dp.delta) < 0.6  # one round spends only part of it


def test_plan_dp_round_is_stable_across_calls_and_fresh_caches() -> None:
    plan = plan_for()
    first = plan_dp_round(plan, site_for(), 100)
    again = plan_dp_round(TrainingPlan.from_json(plan.to_json()), site_for(), 100)
    budget._noise.cache_clear()  # a fresh process: the calibration itself is deterministic
    fresh = plan_dp_round(plan, site_for(), 100)
    assert first == again == fresh


@pytest.fixture
def calibrations(monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    """Stub the (slow) calibration and record what it is asked for."""
    calls: list[tuple] = []

    def fake(target_epsilon, delta, sample_rate, steps, accountant):
        calls.append((target_epsilon, delta, sample_rate, steps, accountant))
        return 2.5

    monkeypatch.setattr(budget, "_noise", fake)
    return calls


def test_the_site_delta_is_used_whatever_the_study_asks() -> None:
    plan = plan_for()
    own = plan_dp_round(plan, site_for(delta=1e-4), 100)
    default = plan_dp_round(plan, site_for(delta=1e-5), 100)
    assert own.delta == 1e-4 and default.delta == 1e-5
    assert own.noise_multiplier < default.noise_multiplier  # a larger delta needs less noise
    # calibrated at the site's delta: the planned rounds land at the target *at that delta*
    assert 0.95 <= epsilon([own.step] * plan.rounds, 1e-4) <= 1.0
    assert epsilon([own.step] * plan.rounds, 1e-5) > 1.0


def test_site_without_privacy_section_is_refused_before_calibration(calibrations: list[tuple]) -> None:
    with pytest.raises(ConfigError, match=r"site 'st-luke'.*no \[privacy\] section"):
        plan_dp_round(plan_for(), site_for(with_privacy=False), 100)
    assert calibrations == []


@pytest.mark.parametrize(("site_delta", "study_delta", "n_train"), [(1e-5, 1e-6, 100_000), (0.01, 1e-5, 100), (0.02, 1e-5, 100)])
def test_delta_not_below_one_over_n_is_refused_naming_the_site(site_delta, study_delta, n_train, calibrations) -> None:
    plan = plan_for(privacy=dataclasses.replace(plan_for().privacy, delta=study_delta))
    with pytest.raises(ConfigError) as info:
        plan_dp_round(plan, site_for("st-mungo", delta=site_delta), n_train)
    message = str(info.value)
    assert "site 'st-mungo'" in message and "delta" in message and "1/n_train" in message
    assert "\n" not in message
    assert calibrations == []  # refused before any calibration
    # just below 1/n is accepted
    ok_delta = 0.5 / n_train
    assert plan_dp_round(plan, site_for("st-mungo", delta=ok_delta), n_train).delta == ok_delta


@pytest.mark.parametrize(("batch", "n_train", "rate"), [(10, 200, 0.05), (7, 70, 0.1), (70, 70, 1.0), (500, 200, 1.0)])
def test_sample_rate_is_batch_over_n_capped_at_one(batch, n_train, rate, calibrations) -> None:
    plan = plan_for(batch_size=batch, rounds=3, local_steps=4, privacy=PrivacyConfig(dp=True, target_epsilon=2.0, accountant="prv"))
    dp = plan_dp_round(plan, site_for(), n_train)
    assert dp.sample_rate == pytest.approx(rate) and dp.sample_rate <= 1.0
    assert dp.steps == 4 and dp.noise_multiplier == 2.5 and dp.accountant == "prv"
    assert calibrations == [(2.0, 1e-5, pytest.approx(rate), 12, "prv")]


def test_capped_sample_rate_is_calibrated_as_full_batch() -> None:
    capped = plan_dp_round(plan_for(batch_size=500, rounds=2, local_steps=5), site_for(), 200)
    assert capped.sample_rate == 1.0
    assert capped.noise_multiplier == calibrate_noise(1.0, 1e-5, 1.0, 10)


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_repeated_mechanisms_compose_exactly_as_one_entry(accountant: str) -> None:
    """A ledger's many rounds of one study are merged before accounting; the epsilon must not change."""
    rounds = [(1.1, 0.05, 20)] * 6 + [(2.0, 0.1, 10)] * 3
    opacus = RDPAccountant() if accountant == "rdp" else PRVAccountant()
    opacus.history = list(rounds)  # Opacus composing every entry itself
    assert epsilon(rounds, DELTA, accountant) == pytest.approx(opacus.get_epsilon(delta=DELTA), rel=1e-6)
    assert compose(rounds) == [(1.1, 0.05, 120), (2.0, 0.1, 30)]


def test_a_recorded_noise_multiplier_is_reused_only_while_it_is_the_calibrated_one(tmp_path: Path, monkeypatch) -> None:
    from client.privacy.ledger import LedgerEntry, PrivacyLedger

    plan = plan_for(study="reuse", rounds=4, local_steps=10, batch_size=10)
    site = SiteConfig("st-luke", DataSpec(Path("/nonexistent/data.csv"), "y"), privacy=SitePrivacy(tmp_path / "l.sqlite", 10.0, DELTA))
    fresh = plan_dp_round(plan, site, 200)
    calibrations = []
    monkeypatch.setattr(budget, "_noise", lambda *a: calibrations.append(a) or calibrate_noise(*a))
    ledger = PrivacyLedger(tmp_path / "l.sqlite", "st-luke")
    try:
        ledger.record(LedgerEntry("reuse", 1, 10, fresh.sample_rate, fresh.noise_multiplier, 0.8, "rdp", DELTA, 0.0))
        assert plan_dp_round(plan, site, 200, ledger).noise_multiplier == fresh.noise_multiplier
        assert calibrations == []  # reused, confirmed by one accountant evaluation
        # The same study name re-planned with more rounds needs more noise: recalibrated.
        longer = plan_dp_round(plan_for(study="reuse", rounds=8, local_steps=10, batch_size=10), site, 200, ledger)
        assert len(calibrations) == 1 and longer.noise_multiplier > fresh.noise_multiplier
        # A smaller multiplier in the ledger (edited, or from a looser plan) is never used.
        ledger.record(LedgerEntry("reuse", 2, 10, fresh.sample_rate, fresh.noise_multiplier / 2, 0.8, "rdp", DELTA, 0.0))
        assert plan_dp_round(plan, site, 200, ledger).noise_multiplier == pytest.approx(fresh.noise_multiplier)
        assert len(calibrations) == 2
    finally:
        ledger.close()
