"""Commands of the consortium admin and the researcher."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from shared.metrics import PRIMARY
from shared.paths import DEFAULT_STUDY

console = Console()


def simulate_command(
    study: Annotated[Optional[Path], typer.Argument(help="Study file (TOML). Default: the bundled TCGA-BRCA survival study (6 regions).")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Run directory for metrics.jsonl, report.json/html, model.pt. Default: runs/<study name>.")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show Flower's and Ray's own log on the console too.")] = False,
    resume: Annotated[Optional[Path], typer.Option("--resume", help="Continue the interrupted run in this run directory from its last checkpointed round (same study file).")] = None,
) -> None:
    """Run a study as a simulated federation on this machine (every site is a virtual Flower node)."""
    from server.simulate import simulate

    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s")
    if resume is not None and out is not None and out.resolve() != resume.resolve():
        from shared.errors import ConfigError

        raise ConfigError(f"--resume {resume} continues in its own run directory; drop --out {out}")
    report = simulate(study or DEFAULT_STUDY, out, verbose=verbose, echo=console.print, resume=resume)
    print_summary(report)


def print_summary(report: dict) -> None:
    """The final per-site table in the terminal."""
    task = report["study"]["task"]
    primary = report["primary_metric"]
    metrics = {"binary": ["roc_auc", "pr_auc", "accuracy", "sensitivity", "specificity"], "regression": ["rmse", "mae", "pearson_r"], "survival": ["c_index"]}[task]
    short = {"roc_auc": "ROC AUC", "pr_auc": "PR AUC", "accuracy": "acc", "sensitivity": "sens", "specificity": "spec", "c_index": "C-index", "rmse": "RMSE", "mae": "MAE", "pearson_r": "r"}
    table = Table(title=f"{report['study']['name']}: final global model on each site's test split")
    table.add_column("site", no_wrap=True)
    for header in ["train", "test", *metrics]:
        table.add_column(short.get(header, header), justify="right")
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    for name, row in report["final"]["sites"].items():
        table.add_row(name, str(row.get("n_train", "")), str(row.get("n_test", "")), *[fmt(row.get(m)) for m in metrics])
    table.add_row("[bold]mean", "", "", *[fmt(report["final"]["mean"].get(m)) for m in metrics])
    console.print(table)
    best = "higher" if PRIMARY[task][1] else "lower"
    out = Path(report.get("run_dir", "."))
    console.print(f"Primary metric: {primary} ({best} is better). Report: [bold]{out / 'report.html'}[/] and report.json")
