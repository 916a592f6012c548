"""Commands of a hospital's IT team."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from shared.config import load_site, load_study
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
    for warning in data.warnings:
        console.print(f"[yellow]warning[/] {warning}")
