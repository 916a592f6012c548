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
) -> None:
    """Run a study as a simulated federation on this machine (every site is a virtual Flower node)."""
    from server.simulate import simulate

    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s")
    report = simulate(study or DEFAULT_STUDY, out, verbose=verbose, echo=console.print)
    print_summary(report)


def print_summary(report: dict) -> None:
    """The final per-site table in the terminal."""
    task = report["study"]["task"]
    primary = report["primary_metric"]
    metrics = {"binary": ["roc_auc", "pr_auc", "accuracy", "sensitivity", "specificity"], "regression": ["rmse", "mae", "pearson_r"], "survival": ["c_index"], "multitask": ["roc_auc", "pr_auc"]}[task]
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


def partition_command(
    csv: Annotated[Path, typer.Argument(help="Molecule table (CSV) with a SMILES column and label column(s).")],
    by: Annotated[str, typer.Option("--by", help="scaffold (Bemis-Murcko groups kept whole), random, or dirichlet (label skew).")] = "scaffold",
    sites: Annotated[int, typer.Option("--sites", "-n", help="Number of simulated companies.")] = 4,
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory for the company CSVs, site files and study.toml.")] = Path("partition"),
    label: Annotated[Optional[list[str]], typer.Option("--label", help="Label column (repeat for multitask). Default: inferred.")] = None,
    task: Annotated[Optional[str], typer.Option("--task", help="binary, multitask or regression. Default: inferred from the labels.")] = None,
    smiles: Annotated[Optional[str], typer.Option("--smiles", help="SMILES column. Default: the column named 'smiles'.")] = None,
    alpha: Annotated[float, typer.Option("--alpha", help="Dirichlet concentration for --by dirichlet (smaller = more skew).")] = 0.5,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the split.")] = 0,
    name: Annotated[Optional[str], typer.Option("--name", help="Study name. Default: the --out directory's name.")] = None,
) -> None:
    """Split a molecule table into simulated companies and write a ready-to-run study."""
    from server.partition import partition

    if task is not None and task not in ("binary", "multitask", "regression"):
        from shared.errors import ConfigError

        raise ConfigError(f"--task must be binary, multitask or regression, got '{task}'")
    result = partition(csv, by, sites, out, labels=label, task=task, smiles=smiles, seed=seed, alpha=alpha, name=name)
    console.print(f"{csv.name} -> {len(result.sites)} companies by {by}; task {result.task}, label(s) {', '.join(result.labels[:3])}{', ...' if len(result.labels) > 3 else ''}")
    table = Table()
    table.add_column("site")
    table.add_column("molecules", justify="right")
    for site, n in result.sites.items():
        table.add_row(site, str(n))
    console.print(table)
    if result.invalid:
        console.print(f"{result.invalid} SMILES could not be parsed; they stay in the CSVs and the site files skip them (invalid_smiles = \"skip\").")
    console.print(f"Study: [bold]{result.study}[/]  run it with: fedhelix simulate {result.study}")
