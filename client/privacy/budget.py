"""Per-site DP settings for a study: noise calibrated once from the plan, budget checked per round."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from client.audit import audit_path
from shared.accounting import Step, calibrate_noise, is_calibrated
from client.privacy.ledger import PrivacyLedger
from shared.config import SiteConfig, SitePrivacy
from shared.errors import ConfigError
from shared.plan import TrainingPlan


@dataclass(frozen=True)
class DPRound:
    """What one round of DP-SGD at this site costs and how it is run."""

    noise_multiplier: float
    sample_rate: float
    steps: int
    delta: float
    max_grad_norm: float
    accountant: str

    @property
    def step(self) -> Step:
        return (self.noise_multiplier, self.sample_rate, self.steps)


@lru_cache(maxsize=32)
def _noise(target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str) -> float:
    return calibrate_noise(target_epsilon, delta, sample_rate, steps, accountant)


def site_privacy(site: SiteConfig) -> SitePrivacy:
    """The site's own privacy governance, required before any DP round."""
    if site.privacy is None:
        raise ConfigError(
            f"site '{site.name}': this study uses differential privacy but the site file {site.path} has no "
            "[privacy] section; add ledger, epsilon_budget and delta so spending can be tracked"
        )
    return site.privacy


def plan_dp_round(plan: TrainingPlan, site: SiteConfig, n_train: int, ledger: PrivacyLedger | None = None) -> DPRound:
    """Calibrate the noise so that rounds x local_steps Poisson steps land at the study's target epsilon.

    The calibration depends only on the plan and the site's size, so every
    round finds the same noise multiplier. A deployed round runs in a fresh
    process, where the calibration's binary search costs seconds of CPU; with
    ``ledger``, the multiplier this study's earlier rounds recorded is reused
    once one accountant evaluation confirms it is still the calibrated value.
    """
    privacy = plan.privacy
    delta = site_privacy(site).delta  # the site's, never the study's: the ledger is kept at one delta
    if delta >= 1.0 / n_train:
        raise ConfigError(
            f"site '{site.name}': delta={delta:g} is not below 1/n_train = {1.0 / n_train:.2g}; "
            "a delta that large allows leaking a whole record. Set a smaller [privacy] delta"
        )
    sample_rate = min(1.0, plan.batch_size / n_train)
    steps = plan.rounds * plan.local_steps
    recorded = _recorded_noise(ledger, plan, delta, sample_rate) if ledger is not None else None
    if recorded is not None and is_calibrated(recorded, privacy.target_epsilon, delta, sample_rate, steps, privacy.accountant):
        sigma = recorded
    else:
        sigma = _noise(privacy.target_epsilon, delta, sample_rate, steps, privacy.accountant)
    return DPRound(sigma, sample_rate, plan.local_steps, delta, privacy.max_grad_norm, privacy.accountant)


def _recorded_noise(ledger: PrivacyLedger, plan: TrainingPlan, delta: float, sample_rate: float) -> float | None:
    """The noise multiplier of this study's latest round in the ledger at the same sampling and delta."""
    for entry in reversed(ledger.entries):
        if entry.study == plan.study:
            same = (entry.sample_rate, entry.steps, entry.delta, entry.accountant) == (sample_rate, plan.local_steps, delta, plan.privacy.accountant)
            return entry.noise_multiplier if same else None
    return None


def open_ledger(site: SiteConfig, ledger_dir: str | Path | None = None, audit_log: str | Path | None = None) -> tuple[PrivacyLedger, float]:
    """The site's ledger and budget; ``ledger_dir`` relocates ledgers (simulations, node config ``ledger-dir``).

    ``audit_log`` is the log this node writes (in a simulation, the simulation's):
    a ledger that is missing, or shorter than the DP rounds the log records, is
    refused instead of starting the budget afresh. Left out, the log beside the
    site file is consulted for a ledger that is not relocated; a relocated one
    cannot guess its log. A relocated ledger keeps its key beside it, so a
    simulation never creates or reads the site's real key.
    """
    privacy = site_privacy(site)
    if ledger_dir:
        path, key = Path(ledger_dir) / f"{site.name}.ledger.sqlite", None
    else:
        path, key = privacy.ledger, privacy.ledger_key
    if audit_log is None and not ledger_dir and site.path is not None:
        audit_log = audit_path(site.name, site.path)
    return PrivacyLedger(path, site.name, key, audit_log=Path(audit_log) if audit_log is not None else None), privacy.epsilon_budget
