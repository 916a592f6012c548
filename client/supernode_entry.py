"""Process entry of a fedhelix node: Flower's SuperNode with the approval gate installed.

``python -m client.supernode_entry --site S --consortium C --approvals FILE --admin-cert FILE -- <flower-supernode args>``
``fedhelix node`` builds this command after its checks; it is not meant to be typed.
With ``--fast`` the SuperNode also polls quickly (:mod:`client.fast_supernode`); the warm
ClientApp launcher (:mod:`client.launcher`) then runs beside it as a second process.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from client import node_gate
from shared.pki import load_certificate


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    ours, flower = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(prog="fedhelix-supernode")
    parser.add_argument("--site", required=True)
    parser.add_argument("--consortium", required=True)
    parser.add_argument("--approvals", required=True, type=Path)
    parser.add_argument("--admin-cert", required=True, type=Path)
    parser.add_argument("--fast", action="store_true", help="short polls (client.fast_supernode) instead of Flower's 3 s sleeps")
    parser.add_argument("--wake-name", help="with --fast: wake the launcher listening on this socket name when a message arrives")
    args = parser.parse_args(ours)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s fedhelix-node: %(message)s"))
    ours = logging.getLogger("fedhelix")
    ours.addHandler(handler)
    ours.setLevel(logging.INFO)
    ours.propagate = False  # Flower configures the root logger its own way
    node_gate.install(args.site, args.consortium, args.approvals, load_certificate(args.admin_cert))

    if args.fast:
        from client.fast_supernode import apply_short_polls, wake_launcher_on_message

        apply_short_polls()
        wake_launcher_on_message(args.wake_name)
    from flwr.supernode.cli.flower_supernode import flower_supernode

    sys.argv = ["flower-supernode", *flower]
    flower_supernode()


if __name__ == "__main__":
    main()
