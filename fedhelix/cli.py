"""The ``fedhelix`` program: researcher, consortium-admin and hospital-IT commands."""

from __future__ import annotations

import sys

import typer
from rich.console import Console

from client.cli import check_site_command, ledger_show_command
from server.cli import partition_command, simulate_command
from shared.errors import FedhelixError

app = typer.Typer(
    name="fedhelix",
    help="Federated learning across hospitals: data stays at each site, only model updates travel.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# Typer 0.20 does not print argument help, so each command's text names its argument.
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
ledger_app.command("show", help="Print the privacy ledger of the site file SITE: history, epsilon spent, budget remaining.")(ledger_show_command)
app.add_typer(ledger_app, name="ledger")


def main() -> None:
    """Entry point: user errors end in one red line and exit code 2, never a traceback."""
    try:
        app()
    except FedhelixError as err:
        Console(stderr=True).print(f"[bold red]error:[/] {err.line}", highlight=False, soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
