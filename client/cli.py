"""Commands of a hospital's IT team."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from rich.table import Table

from shared.config import load_site, load_study
from shared.errors import ConfigError
from shared.contract import load_site_data

console = Console()


def check_site_command(
    site: Annotated[Path, typer.Argument(help="The site file (TOML) describing this hospital's data.")],
    study: Annotated[Optional[Path], typer.Option("--study", help="Check against this study's task and categories (default: survival if a time column is set, else binary).")] = None,
) -> None:
    """Check the site's data against the contract, locally; nothing is sent anywhere."""
    config = load_site(site)
    if study is not None:
        s = load_study(study)
        task, categories = s.task, s.categories
    else:
        task, categories = ("survival" if config.data.time else "binary"), {}
    data = load_site_data(config, task, categories)
    console.print(f"[green]OK[/] site '{config.name}': {data.n_train} train / {data.n_test} test rows, {len(data.feature_names)} features ({task} task)")
    if config.data.tables:
        console.print(f"  {len(config.data.tables)} tables joined on the patient id; {len(data.omics_features)} omics features ({data.join_dropped} patient(s) dropped by the join)")
    for warning in data.warnings:
        console.print(f"[yellow]warning[/] {warning}")


def ledger_show_command(
    site: Annotated[Path, typer.Argument(help="The site file whose [privacy] ledger to show.")],
    accountant: Annotated[str, typer.Option(help="Accountant used to compose the history: rdp or prv.")] = "rdp",
) -> None:
    """Show every DP round this site's data was used for, epsilon spent and budget left."""
    from client.privacy.ledger import PrivacyLedger

    config = load_site(site)
    if config.privacy is None:
        raise ConfigError(f"site file {config.path} has no [privacy] section (ledger, epsilon_budget)")
    if not config.privacy.ledger.exists():
        console.print(f"site '{config.name}': no ledger yet at {config.privacy.ledger} (nothing spent; it is created on first use)")
        return
    ledger = PrivacyLedger(config.privacy.ledger, config.name)
    entries = ledger.entries
    table = Table(title=f"privacy ledger of site '{config.name}' ({config.privacy.ledger})")
    for column in ("#", "when", "study", "round", "steps", "q", "sigma", "C", "accountant", "epsilon after"):
        table.add_column(column, justify="right")
    for i, e in enumerate(entries, start=1):
        table.add_row(str(i), e.created, e.study, str(e.round), str(e.steps), f"{e.sample_rate:.4f}", f"{e.noise_multiplier:.3f}", f"{e.max_grad_norm:g}", e.accountant, f"{e.epsilon_after:.3f}")
    console.print(table)
    delta = config.privacy.delta  # the site's delta: the one its live budget checks use
    spent = ledger.spent(delta, accountant)
    budget = config.privacy.epsilon_budget
    console.print(f"spent epsilon = {spent:.3f} at delta = {delta:g} ({accountant}, all studies composed); budget {budget:g}; remaining {max(budget - spent, 0):.3f}")
    ledger.close()
