"""The approval gate inside the SuperNode: no unapproved study or code reaches the ClientApp.

The check must run in the node's own process, not in the ClientApp: the ClientApp is
code the server sends, so a check there could be removed by whoever sends it. Flower's
SuperNode already has one gate on this path, the FAB verification it runs for each new
run when ``trusted_entities`` is set (it replies an ``INVALID_FAB`` error and never
starts the ClientApp). Flower OSS fills that gate only from its hub licence, so we put
our own check behind it: the run must carry a study signed by the consortium admin,
and the site must have approved that study file with that code.

This wraps private names of ``flwr.supernode.start_client_internal`` (pinned flwr
1.42.0); :func:`install` asserts they exist so an upgrade fails loudly, not open.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography import x509

from client.approval import check_run, read_approvals
from shared.approval import ApprovalError

log = logging.getLogger("fedhelix.node")

_MARK = "fedhelix-approved"
_TARGETS = ("_pull_and_store_message", "_verify_fab", "FAB_VERIFICATION_ERROR")


def install(site: str, consortium: str, approvals_file: Path, admin_cert: x509.Certificate) -> None:
    """Patch the SuperNode loop in this process so every new run passes :func:`client.approval.check_run`."""
    from flwr.app import Error
    from flwr.common.constant import ErrorCode
    from flwr.supercore.fab import Fab
    from flwr.supernode import start_client_internal as sci

    missing = [name for name in _TARGETS if not hasattr(sci, name)]
    if missing:
        raise RuntimeError(f"flwr changed: start_client_internal lacks {missing}; the approval gate cannot be installed")
    pull_and_store = sci._pull_and_store_message

    def checking_get_fab(get_fab: Callable[[str, int], Any], get_run: Callable[[int], Any]) -> Callable[[str, int], Any]:
        def fetch(fab_hash: str, run_id: int) -> Any:
            fab = get_fab(fab_hash, run_id)
            run = get_run(run_id)
            try:
                approval = check_run(site, consortium, dict(run.override_config), fab.content, admin_cert, read_approvals(approvals_file))
            except ApprovalError as err:
                log.error("run %s refused: %s", run_id, err.line)
                sci.FAB_VERIFICATION_ERROR = Error(ErrorCode.INVALID_FAB, str(err))
                return Fab(fab.hash_str, fab.content, {})  # no mark: Flower replies the error above
            log.info("run %s: study '%s' approved on %s by %s", run_id, approval.study, approval.approved_at, approval.approved_by)
            return Fab(fab.hash_str, fab.content, {**fab.verifications, "valid_license": _MARK})

        return fetch

    def gated_pull_and_store(**kwargs: Any) -> Any:
        kwargs["get_fab"] = checking_get_fab(kwargs["get_fab"], kwargs["get_run"])
        kwargs["trusted_entities"] = {"fedhelix": "site approvals"}  # switches Flower's gate on
        return pull_and_store(**kwargs)

    sci._pull_and_store_message = gated_pull_and_store
    sci._verify_fab = lambda fab, _entities: fab.verifications.get("valid_license") == _MARK
