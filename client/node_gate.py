"""The approval gate inside the SuperNode: no unapproved study or code reaches the ClientApp.

The check must run in the node's own process, not in the ClientApp: the ClientApp is
code the server sends, so a check there could be removed by whoever sends it. Flower's
SuperNode already has one gate on this path, the FAB verification it runs for each new
run when ``trusted_entities`` is set (it replies an ``INVALID_FAB`` error and never
starts the ClientApp). Flower OSS fills that gate only from its hub licence, so we put
our own check behind it (:func:`client.approval.check_run`): only approvable files in the
bundle, a run signed by the consortium admin and not expired, approved by the site with
that code, and a run identity within the runs and resumes the site allowed.

The reason for a refusal stays at the site (its log); the server gets a fixed phrase
with a code (:func:`coordinator_reason`), never site data such as names or digests.

This wraps private names of ``flwr.supernode.start_client_internal`` (pinned flwr
1.42.0); :func:`install` asserts they exist so an upgrade fails loudly, not open.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography import x509

from client.approval import check_run
from shared.approval import ATTEMPT_KEY, NONCE_KEY, ApprovalError, ExpiredError, NotApprovedError, RunLimitError, SignatureError, UnapprovedFilesError

log = logging.getLogger("fedhelix.node")

_MARK = "fedhelix-approved"
_TARGETS = ("_pull_and_store_message", "_verify_fab", "FAB_VERIFICATION_ERROR")

# What the coordinator learns of a refusal: the kind, never the site's data.
_REASONS: tuple[tuple[type[BaseException], str], ...] = (
    (UnapprovedFilesError, "E-APPROVAL-FILES the app bundle holds files outside the approved set"),
    (SignatureError, "E-APPROVAL-SIGNATURE the run is not signed by the consortium admin for this fedhelix release"),
    (ExpiredError, "E-APPROVAL-EXPIRED the admin's signature of the run has expired"),
    (NotApprovedError, "E-APPROVAL-NOT-APPROVED the site has not approved this study with this code"),
    (RunLimitError, "E-APPROVAL-REPLAY the run identity was replayed or exceeds the runs the site approved"),
)


def coordinator_reason(err: BaseException) -> str:
    """The fixed line the server receives for a refusal (``fedhelix:`` marked, so its report shows it)."""
    phrase = next((text for kind, text in _REASONS if isinstance(err, kind)), "E-APPROVAL the site could not check the run")
    return f"fedhelix: {phrase}; the site refused the run (the reason is in the site's log)"


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
                approval = check_run(site, consortium, dict(run.override_config), fab.content, admin_cert, approvals_file, run_id)
            except Exception as err:  # noqa: BLE001 - whatever fails (a corrupt runs file too), the run is refused
                line = err.line if isinstance(err, ApprovalError) else f"site '{site}' could not check run {run_id}: {type(err).__name__}: {err}"
                log.error("run %s refused: %s", run_id, " ".join(line.split()))
                sci.FAB_VERIFICATION_ERROR = Error(ErrorCode.INVALID_FAB, coordinator_reason(err))
                return Fab(fab.hash_str, fab.content, {})  # no mark: Flower replies the error above
            log.info(
                "run %s: study '%s' approved on %s by %s (run identity %s, attempt %s)",
                run_id, approval.study, approval.approved_at, approval.approved_by,
                run.override_config.get(NONCE_KEY), run.override_config.get(ATTEMPT_KEY),
            )  # fmt: skip
            return Fab(fab.hash_str, fab.content, {**fab.verifications, "valid_license": _MARK})

        return fetch

    def gated_pull_and_store(**kwargs: Any) -> Any:
        # One answer per run for Flower and the gate alike: the run config the gate checks is the
        # one the ClientApp gets. A second GetRun could be answered differently by a hostile SuperLink.
        asked = kwargs["get_run"]
        answers: dict[int, Any] = {}

        def get_run_once(run_id: int) -> Any:
            if run_id not in answers:
                answers[run_id] = asked(run_id)
            return answers[run_id]

        kwargs["get_run"] = get_run_once
        kwargs["get_fab"] = checking_get_fab(kwargs["get_fab"], get_run_once)
        kwargs["trusted_entities"] = {"fedhelix": "site approvals"}  # switches Flower's gate on
        return pull_and_store(**kwargs)

    sci._pull_and_store_message = gated_pull_and_store
    sci._verify_fab = lambda fab, _entities: fab.verifications.get("valid_license") == _MARK
