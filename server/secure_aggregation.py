"""SecAgg+ for fedhelix: parameters derived from the study, and no silent halts.

Flower 1.42's ``SecAggPlusWorkflow`` logs "Secure aggregation halted" and lets
the run end as *completed* with the model unchanged. :class:`StrictSecAggPlus`
raises instead, so the study fails loudly and the report marks the round.

Derivation (documented in docs/secure-aggregation.md):

* ``modulus_range`` M = 2^32 (Flower's default; masks are uniform below M).
* ``quantization_range`` Q = the largest power of two with n_sites x Q < M, so
  the sum of n quantised values in [0, Q] cannot wrap around (Flower does not check).
* ``clipping_range`` c = the study's per-coordinate ``update_bound``; each site
  clips its delta to [-c, c] *before* the protocol, so Flower's own clipping of
  ``delta x n_i / max_weight`` (n_i <= max_weight) never bites silently.
* ``max_weight`` W = the largest site's n_train, reported in the handshake.
* ``num_shares`` k = n (or n-1, kept odd: even values halt every round), capped
  at 2 ceil(log2 n) + 1 (at least 5) so cost stays flat as sites grow.
* ``reconstruction_threshold`` t = k - max(max_dropouts, 1) (Flower needs t < k),
  required > k/2 (a majority of a site's neighbours must cooperate to unmask
  anything) and >= 2.
* Quantisation error of the aggregated mean delta, per coordinate:
  |error| < n x (2c/Q) x W / sum(n_i)  (stochastic rounding, one step per site).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from flwr.server.workflow import SecAggPlusWorkflow

from server.strategy import StudyAborted
from shared.errors import ConfigError

MODULUS_RANGE = 2**32
MIN_QUANTIZATION_BITS = 16


@dataclass(frozen=True)
class SecAggParams:
    num_shares: int
    reconstruction_threshold: int
    clipping_range: float
    quantization_range: int
    modulus_range: int
    max_weight: float

    def error_bound(self, n_sites: int, total_examples: int) -> float:
        """Largest per-coordinate quantisation error of the aggregated (mean) delta."""
        step = 2 * self.clipping_range / self.quantization_range
        return n_sites * step * self.max_weight / total_examples


def derive_params(n_sites: int, max_dropouts: int, update_bound: float, max_weight: int) -> SecAggParams:
    """SecAgg+ parameters for ``n_sites``; a configuration that cannot work is rejected here, before round 1."""
    if n_sites < 3:
        raise ConfigError(f"secure aggregation needs at least 3 sites (the study has {n_sites}); add sites or set [study] secure_aggregation = false")
    quant_bits = int(math.floor(math.log2((MODULUS_RANGE - 1) / n_sites)))
    if quant_bits < MIN_QUANTIZATION_BITS:
        raise ConfigError(f"{n_sites} sites leave only {quant_bits} quantisation bits under modulus 2^32; the sum would lose precision")
    shares = n_sites if n_sites % 2 == 1 else n_sites - 1
    shares = min(shares, max(5, 2 * math.ceil(math.log2(n_sites)) + 1))
    threshold = shares - max(max_dropouts, 1)
    if max_dropouts < 0 or threshold <= shares / 2 or threshold < 2:
        raise ConfigError(
            f"max_dropouts = {max_dropouts} is too many for {n_sites} sites: each site shares its keys with {shares} "
            f"neighbours and unmasking needs a majority (> {shares // 2}) of them; allow at most {math.ceil(shares / 2) - 1} dropouts"
        )
    if max_weight <= 0:
        raise ConfigError("max_weight must be positive (the largest site's number of training examples)")
    return SecAggParams(
        num_shares=shares,
        reconstruction_threshold=threshold,
        clipping_range=float(update_bound),
        quantization_range=2**quant_bits,
        modulus_range=MODULUS_RANGE,
        max_weight=float(max_weight),
    )


class StrictSecAggPlus(SecAggPlusWorkflow):
    """Flower's SecAgg+ workflow, but a halted stage aborts the study instead of passing silently."""

    def __init__(self, params: SecAggParams, timeout: float | None = None) -> None:
        super().__init__(
            num_shares=params.num_shares,
            reconstruction_threshold=params.reconstruction_threshold,
            max_weight=params.max_weight,
            clipping_range=params.clipping_range,
            quantization_range=params.quantization_range,
            modulus_range=params.modulus_range,
            timeout=timeout,
        )

    def _strict(self, stage: str, ok: bool, context) -> bool:
        if not ok:
            from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, Key

            cfg = context.state.config_records[MAIN_CONFIGS_RECORD]
            raise StudyAborted(
                f"secure aggregation halted in the {stage} stage of round {cfg[Key.CURRENT_ROUND]} "
                "(too many sites failed or dropped out); the global model was not updated"
            )
        return ok

    def setup_stage(self, grid, context, state) -> bool:  # noqa: D102
        return self._strict("setup", super().setup_stage(grid, context, state), context)

    def share_keys_stage(self, grid, context, state) -> bool:  # noqa: D102
        return self._strict("share-keys", super().share_keys_stage(grid, context, state), context)

    def collect_masked_vectors_stage(self, grid, context, state) -> bool:  # noqa: D102
        return self._strict("collect-masked-vectors", super().collect_masked_vectors_stage(grid, context, state), context)

    def unmask_stage(self, grid, context, state) -> bool:  # noqa: D102
        return self._strict("unmask", super().unmask_stage(grid, context, state), context)
