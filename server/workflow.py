"""Flower's ``DefaultWorkflow`` that can start at a later round and reports each completed round.

Flower 1.42's ``DefaultWorkflow`` always runs rounds 1..N. Resuming a study
needs rounds k+1..N from a restored global model, and checkpointing needs a
hook once a round's fit *and* evaluate steps are both done. The loop below is
Flower's own (same init, fit, centralised and federated evaluation steps), with
those two additions.
"""

from __future__ import annotations

import logging
import timeit
from collections.abc import Callable

from flwr.server import LegacyContext
from flwr.server.workflow import DefaultWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, Key
from flwr.server.workflow.default_workflows import default_centralized_evaluation_workflow, default_init_params_workflow
from flwr.serverapp import Grid
from flwr.app import ConfigRecord

log = logging.getLogger("fedhelix.server")

RoundDone = Callable[[int, LegacyContext], None]


class ResumableWorkflow(DefaultWorkflow):
    """Runs rounds ``start_round``..N; calls ``after_round(round, context)`` after each."""

    def __init__(self, fit_workflow=None, evaluate_workflow=None, *, start_round: int = 1, after_round: RoundDone | None = None) -> None:
        super().__init__(fit_workflow=fit_workflow, evaluate_workflow=evaluate_workflow)
        self.start_round = start_round
        self.after_round = after_round

    def __call__(self, grid: Grid, context: LegacyContext) -> None:  # noqa: D102
        if not isinstance(context, LegacyContext):
            raise TypeError(f"Expect a LegacyContext, but get {type(context).__name__}.")
        from flwr.server.compat.app_utils import start_update_client_manager_thread

        thread, f_stop, c_done = start_update_client_manager_thread(grid, context.client_manager)
        c_done.wait()
        try:
            default_init_params_workflow(grid, context)  # the strategy's initial parameters: a checkpoint's on resume
            cfg = ConfigRecord()
            cfg[Key.START_TIME] = timeit.default_timer()
            context.state.config_records[MAIN_CONFIGS_RECORD] = cfg
            if self.start_round > 1:
                log.info("resuming at round %d of %d", self.start_round, context.config.num_rounds)
            for current_round in range(self.start_round, context.config.num_rounds + 1):
                cfg[Key.CURRENT_ROUND] = current_round
                self.fit_workflow(grid, context)
                default_centralized_evaluation_workflow(grid, context)
                self.evaluate_workflow(grid, context)
                if self.after_round is not None:
                    self.after_round(current_round, context)
        finally:
            f_stop.set()
            thread.join()
