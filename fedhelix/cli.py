"""The ``fedhelix`` program: researcher, consortium-admin and hospital-IT commands."""

from __future__ import annotations

import sys

import typer
from rich.markup import escape
from client.cli import approve_command, audit_verify_command, check_site_command, ledger_show_command, node_command
from server.cli import partition_command, provision_command, run_command, server_command, simulate_command, status_command
from shared.errors import FedhelixError
from shared.terminal import plain_console, tagged

app = typer.Typer(
    name="fedhelix",
    help="Federated learning across hospitals: data stays at each site, only model updates travel.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# Typer 0.20 does not print argument help, so each command's text names its argument.
# Typer reads help texts as rich markup: a text naming a [section] goes through escape().
app.command(
    "simulate",
    help="Researchers: run a study as a simulated federation on this machine. STUDY is the study file "
    "(TOML); without it the bundled TCGA-BRCA survival study (6 regions) runs.",
)(simulate_command)
app.command(
    "partition",
    help="Researchers: split the molecule table CSV into simulated companies (--by scaffold|random|dirichlet) "
    "and write company CSVs, site files and a ready-to-run study.toml into --out.",
)(partition_command)
app.command(
    "check-site",
    help="Hospital IT: check the data described by the site file SITE against the contract, offline; nothing is sent.",
)(check_site_command)
ledger_app = typer.Typer(help="Hospital IT: the site's privacy ledger (every DP round spent on its data).", no_args_is_help=True)
ledger_app.command(
    "show", help=escape("Print the privacy ledger named in the [privacy] section of the site file SITE: history, epsilon spent, budget remaining.")
)(ledger_show_command)
app.add_typer(ledger_app, name="ledger")
app.command(
    "provision",
    help="Consortium admin: create the consortium CA, server certificate, admin identity and one node key per site "
    "from the consortium file CONSORTIUM (TOML); writes one kit directory per role. --add-site NAME adds a site later.",
)(provision_command)
app.command(
    "server",
    help="Consortium admin: start the SuperLink (TLS, SuperNode authentication, persistent state) on loopback "
    "behind the gateway that exposes only the Fleet API to sites, and the admin listener that serves the Control "
    "API to the admin's certificate alone.",
)(server_command)
app.command(
    "run",
    help="Consortium admin: sign the study file STUDY with the admin key, submit it to the running server "
    "(from any machine, through the server's admin listener), stream progress and write report.json/report.html "
    "as a simulation does.",
)(run_command)
app.command(
    "status",
    help="Consortium admin: from any machine holding the admin kit, list the sites registered and online, the runs "
    "and their status (through the server's admin listener), and the newest local run directory's last round.",
)(status_command)
app.command(
    "approve",
    help="Hospital IT: approve the study file STUDY (as it is now) with this version of the code; the node "
    "refuses any study or code the site has not approved.",
)(approve_command)
app.command(
    "node",
    help="Hospital IT: check the kit, certificates, site data and the server's TLS certificate, then run this "
    "site's node (outbound connection only).",
)(node_command)
audit_app = typer.Typer(help="Hospital IT: the site's audit log of every message that left it.", no_args_is_help=True)
audit_app.command(
    "verify",
    help="Check the hash chain of the audit log LOG (SITE.audit.jsonl): exit 0 with a summary, exit 2 naming the first edited, removed or reordered entry.",
)(audit_verify_command)
app.add_typer(audit_app, name="audit")


def main() -> None:
    """Entry point: user errors end in one red line and exit code 2, never a traceback."""
    try:
        app()
    except FedhelixError as err:
        plain_console(stderr=True).print(tagged("error:", "bold red", err.line))  # the line as written: fixes name [sections]
        sys.exit(2)


if __name__ == "__main__":
    main()
