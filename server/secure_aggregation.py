"""SecAgg+ at the coordinator: no silent halts, and masks from the shared full-seed PRG.

Flower 1.42's ``SecAggPlusWorkflow`` logs "Secure aggregation halted" and lets
the run end as *completed* with the model unchanged. :class:`StrictSecAggPlus`
raises instead, so the study fails loudly and the report marks the round.

It also unmasks with :func:`shared.secure_aggregation.mask_prg` (the sites mask
with it too, in ``client/secagg_mod.py``) instead of Flower's ``pseudo_rand_gen``,
which folds every seed to 32 bits; and it relays each site's signature over its
public keys to its neighbours, which check it against the run's roster.

The parameter derivation lives in :mod:`shared.secure_aggregation`, so the sites
derive the same numbers and refuse a setup that differs; it is re-exported here.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import flwr.server.workflow.secure_aggregation.secaggplus_workflow as _flwr_workflow
from flwr.app import Message
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen
from flwr.server.workflow import SecAggPlusWorkflow

from server.strategy import StudyAborted
from shared.secure_aggregation import (  # noqa: F401 - re-exported for existing importers
    AUTH_SIGNATURE_KEY,
    AUTH_SITE_KEY,
    MIN_QUANTIZATION_BITS,
    MODULUS_RANGE,
    SecAggParams,
    derive_params,
    mask_prg,
)


_PRG_LOCK = threading.Lock()


@contextmanager
def _unmask_with_mask_prg() -> Iterator[None]:
    """Make Flower's unmask stage draw masks from :func:`mask_prg` while it runs.

    Flower's workflow module calls its own global ``pseudo_rand_gen``; swapping that
    one name is smaller than copying the 100-line stage. It is checked first (a
    Flower upgrade that renames it must fail here, not unmask with the wrong PRG)
    and serialised by a lock so concurrent studies in one process never see it half-swapped.
    """
    with _PRG_LOCK:
        if getattr(_flwr_workflow, "pseudo_rand_gen", None) is not pseudo_rand_gen:
            raise RuntimeError("flwr's SecAgg+ workflow no longer calls pseudo_rand_gen by that name: pin flwr 1.42 or update StrictSecAggPlus")
        _flwr_workflow.pseudo_rand_gen = mask_prg
        try:
            yield
        finally:
            _flwr_workflow.pseudo_rand_gen = pseudo_rand_gen


class _RepliesKept:
    """A grid that remembers the last replies it received (Flower's setup stage keeps only pk1/pk2)."""

    def __init__(self, grid) -> None:
        self._grid = grid
        self.replies: list[Message] = []

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        self.replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        return self.replies

    def __getattr__(self, name: str):
        return getattr(self._grid, name)


class StrictSecAggPlus(SecAggPlusWorkflow):
    """Flower's SecAgg+ workflow, but a halted stage aborts the study instead of passing silently.

    Masks are unmasked with :func:`mask_prg`, and each site's signature over its keys
    (``AUTH_SIGNATURE_KEY``/``AUTH_SITE_KEY`` in its setup reply) travels with its
    public keys to its neighbours: Flower's share-keys stage forwards
    ``state.nid_to_publickeys[nid]`` as is, so appending the two entries there relays them.
    """

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
        kept = _RepliesKept(grid)
        ok = super().setup_stage(kept, context, state)
        for reply in kept.replies:
            if reply.has_error():
                continue
            configs = reply.content.config_records[RECORD_KEY_CONFIGS]
            keys = state.nid_to_publickeys.get(reply.metadata.src_node_id)
            if keys is not None and AUTH_SIGNATURE_KEY in configs and AUTH_SITE_KEY in configs:
                keys.extend([bytes(configs[AUTH_SIGNATURE_KEY]), str(configs[AUTH_SITE_KEY]).encode()])
        return self._strict("setup", ok, context)

    def share_keys_stage(self, grid, context, state) -> bool:  # noqa: D102
        return self._strict("share-keys", super().share_keys_stage(grid, context, state), context)

    def collect_masked_vectors_stage(self, grid, context, state) -> bool:  # noqa: D102
        return self._strict("collect-masked-vectors", super().collect_masked_vectors_stage(grid, context, state), context)

    def unmask_stage(self, grid, context, state) -> bool:  # noqa: D102
        with _unmask_with_mask_prg():
            ok = super().unmask_stage(grid, context, state)
        return self._strict("unmask", ok, context)
