"""Privacy accounting with Opacus's accountants (RDP or PRV); nothing hand-derived. Used by sites (record-level DP-SGD) and the coordinator (site-level DP)."""

from __future__ import annotations

from collections.abc import Sequence

from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

# (noise multiplier sigma, sample rate q, number of steps): Opacus's history format.
Step = tuple[float, float, int]


def epsilon(history: Sequence[Step], delta: float, accountant: str = "rdp") -> float:
    """epsilon after composing every mechanism in ``history`` at ``delta``."""
    if not history:
        return 0.0
    acc = RDPAccountant() if accountant == "rdp" else PRVAccountant()
    acc.history = [(float(s), float(q), int(n)) for s, q, n in history]
    return float(acc.get_epsilon(delta=delta))


def calibrate_noise(target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str = "rdp") -> float:
    """The noise multiplier that makes ``steps`` Poisson-sampled steps land at ``target_epsilon``."""
    return float(
        get_noise_multiplier(
            target_epsilon=target_epsilon,
            target_delta=delta,
            sample_rate=sample_rate,
            steps=steps,
            accountant=accountant,
            epsilon_tolerance=0.005,
        )
    )
