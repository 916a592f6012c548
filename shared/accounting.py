"""Privacy accounting with Opacus's accountants (RDP or PRV); nothing hand-derived. Used by sites (record-level DP-SGD) and the coordinator (site-level DP)."""

from __future__ import annotations

from collections.abc import Sequence

from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

# (noise multiplier sigma, sample rate q, number of steps): Opacus's history format.
Step = tuple[float, float, int]
# How far below the target a calibrated epsilon may land (Opacus's binary search stops within it).
CALIBRATION_TOLERANCE = 0.005


def epsilon(history: Sequence[Step], delta: float, accountant: str = "rdp") -> float:
    """epsilon after composing every mechanism in ``history`` at ``delta``."""
    if not history:
        return 0.0
    acc = RDPAccountant() if accountant == "rdp" else PRVAccountant()
    acc.history = compose(history)
    return float(acc.get_epsilon(delta=delta))


def compose(history: Sequence[Step]) -> list[Step]:
    """Merge steps of the same mechanism (same sigma and q) into one entry with their total count.

    Exact: both accountants compose n runs of one subsampled Gaussian mechanism by
    their count (RDP is linear in it). A ledger of many rounds of one study then costs
    one accountant evaluation, not one per round.
    """
    merged: dict[tuple[float, float], int] = {}
    for sigma, q, n in history:
        key = (float(sigma), float(q))
        merged[key] = merged.get(key, 0) + int(n)
    return [(sigma, q, n) for (sigma, q), n in merged.items()]


def calibrate_noise(target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str = "rdp") -> float:
    """The noise multiplier that makes ``steps`` Poisson-sampled steps land at ``target_epsilon``."""
    return float(
        get_noise_multiplier(
            target_epsilon=target_epsilon,
            target_delta=delta,
            sample_rate=sample_rate,
            steps=steps,
            accountant=accountant,
            epsilon_tolerance=CALIBRATION_TOLERANCE,
        )
    )


def is_calibrated(sigma: float, target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str = "rdp") -> bool:
    """Whether ``sigma`` is what :func:`calibrate_noise` finds: epsilon at most the target, within the tolerance below it.

    One accountant evaluation instead of a calibration's binary search (a dozen or more).
    """
    eps = epsilon([(sigma, sample_rate, steps)], delta, accountant)
    return target_epsilon - 2 * CALIBRATION_TOLERANCE <= eps <= target_epsilon
