"""Commands of the consortium admin and the researcher."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table
from rich.text import Text

from shared.metrics import PRIMARY
from shared.paths import DEFAULT_STUDY
from shared.terminal import plain_console, tagged

console = plain_console()  # prints study names, paths and Flower's log lines as written


def simulate_command(
    study: Annotated[Path | None, typer.Argument(help="Study file (TOML). Default: the bundled TCGA-BRCA survival study (6 regions).")] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Run directory for metrics.jsonl, report.json/html, model.pt. Default: runs/<study name>.")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show Flower's and Ray's own log on the console too.")] = False,
    resume: Annotated[Path | None, typer.Option("--resume", help="Continue the interrupted run in this run directory from its last checkpointed round (same study file).")] = None,
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
    """The final per-site table in the terminal, then the primary metric beside the constant predictor's, and every site where the model is not better."""
    task = report["study"]["task"]
    primary = report["primary_metric"]
    metrics = {"binary": ["roc_auc", "pr_auc", "accuracy", "sensitivity", "specificity"], "regression": ["rmse", "mae", "pearson_r"], "survival": ["c_index"], "multitask": ["roc_auc", "pr_auc"]}[task]
    chosen = f" (round {report['selected_round']}, best on validation)" if report.get("selected_round") is not None else ""
    table = Table(title=f"{report['study']['name']}: final global model{chosen} on each site's test split")
    table.add_column("site", no_wrap=True)
    for header in ["train", "test", *metrics]:
        table.add_column(SHORT.get(header, header), justify="right")
    for name, row in report["final"]["sites"].items():
        table.add_row(name, str(row.get("n_train", "")), str(row.get("n_test", "")), *[_fmt(row.get(m)) for m in metrics])
    table.add_row(Text("mean", style="bold"), "", "", *[_fmt(report["final"]["mean"].get(m)) for m in metrics])
    console.print(table)
    if report.get("personalization"):
        print_personalization(report["personalization"])
    if report.get("baseline"):  # reports written before baselines have none
        print_baseline(report["baseline"])
    best = "higher" if PRIMARY[task][1] else "lower"
    out = Path(report.get("run_dir", "."))
    console.print(Text.assemble(f"Primary metric: {primary} ({best} is better). Report: ", (str(out / "report.html"), "bold"), " and report.json"))


SHORT = {"roc_auc": "ROC AUC", "pr_auc": "PR AUC", "accuracy": "acc", "sensitivity": "sens", "specificity": "spec", "c_index": "C-index", "rmse": "RMSE", "mae": "MAE", "pearson_r": "r"}


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def print_personalization(block: dict) -> None:
    """Each site's personalized model beside the global one, on the same test split."""
    metric = SHORT.get(block["metric"], block["metric"])
    table = Table(title=f"personalized ({block['method']}) vs global model, same test split")
    table.add_column("site", no_wrap=True)
    for header in [f"global {metric}", f"personal {metric}", "global loss", "personal loss"]:
        table.add_column(header, justify="right")
    keys = [f"global_{block['metric']}", f"personalized_{block['metric']}", "global_loss", "personalized_loss"]
    for name, e in [*block["sites"].items(), (Text("mean", style="bold"), block["mean"])]:
        table.add_row(name, *[_fmt(e.get(k)) for k in keys])
    console.print(table)


def print_baseline(review: dict) -> None:
    """Model vs the constant predictor with each site's bootstrap interval; every flag and caution in words."""
    from server.baseline_review import interval_text

    if not review["sites"]:
        return
    verdict = {True: Text("yes"), False: Text("NO", style="bold red"), None: Text("n/a")}
    binary = any("loss_better" in e for e in review["sites"].values())
    table = Table(title="against the constant predictor (same test split)")
    table.add_column("site", no_wrap=True)
    for header in [SHORT.get(review["metric"], review["metric"]), f"{round(review['ci_level'] * 100)}% CI", "const.", "better?", *(["loss", "const."] if binary else [])]:
        table.add_column(header, justify="right", no_wrap=True)
    rows = [(Text(name), e, interval_text(e, review["ci_resamples"], digits=2)) for name, e in review["sites"].items()]
    for name, e, interval in [*rows, (Text("mean", style="bold"), review["mean"], "")]:
        losses = [_fmt(e.get("loss")), _fmt(e.get("baseline_loss"))] if binary else []
        table.add_row(name, _fmt(e["model"]), interval, _fmt(e["baseline"]), verdict[e["better"]], *losses)
    console.print(table)
    for flag in review["flags"]:
        console.print(tagged("not better than baseline:", "bold red", flag))
    for caution in review.get("cautions", []):
        console.print(tagged("caution:", "yellow", caution))
    if not review["flags"]:
        console.print(Text("The final model is better than the constant predictor at every site and on the mean.", style="green"))
    console.print(Text("CI: percentile bootstrap at each site (when not all resamples had the metric defined: how many did); the mean has none.", style="dim"))


# --------------------------------------------------------------------------- deployment


def provision_command(
    consortium: Annotated[Path | None, typer.Argument(help="Consortium file (TOML): [consortium] name, server_address, sites.")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory for the kits: OUT/ca, OUT/server, OUT/admin, OUT/<site>.")] = Path("kits"),
    add_site: Annotated[str | None, typer.Option("--add-site", help="Add one site kit to an existing consortium in OUT (no other key changes).")] = None,
) -> None:
    """Create the consortium CA, server certificate, admin identity and one key per site."""
    from server.provision import add_site as add_one_site
    from server.provision import load_consortium, provision

    if add_site:
        kit = add_one_site(out, add_site)
        console.print(tagged("added", "green", f"site kit {kit}; restart `fedhelix server` (or it registers the key at next start) and hand the kit to the site"))
        return
    if consortium is None:
        raise typer.BadParameter("give the consortium file, or --add-site NAME with --out of an existing consortium")
    config = load_consortium(consortium)
    kits = provision(config, out)
    for kit in kits:
        console.print(tagged("wrote", "green", str(kit)))
    console.print(f"Keep {out / 'ca'} offline (the CA key). Give each site only its own directory.")


def server_command(
    kit: Annotated[Path, typer.Option("--kit", help="The server kit directory written by `fedhelix provision` (kits/server).")],
) -> None:
    """Start the consortium server: SuperLink (TLS, node authentication, persistent state) behind the gateway and the admin listener."""
    import time

    from server.deployment import start_server

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import signal

    def stop_on_sigterm(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt  # docker / systemd / kubernetes stop = Ctrl-C: stop both processes cleanly

    signal.signal(signal.SIGTERM, stop_on_sigterm)
    running = start_server(kit)
    k = running.kit
    console.print(tagged("fedhelix server", "green", f"'{k.consortium}': sites dial {k.listen} (Fleet API only)"))
    if k.admin_listen:
        console.print(f"admin listener on {k.admin_listen}: Control API for the admin's certificate ({k.admin_cert}) only")
    else:
        console.print(f"Control API on https://{k.link_address} (this host only; re-provision for the admin listener)")
    console.print(f"registered sites: {', '.join(k.node_keys())}. Logs: {k.database.parent}/superlink.log, gateway.log. Ctrl-C stops.")
    try:
        while running.superlink.poll() is None and running.gateway.poll() is None:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        running.stop()
    console.print("server stopped")


def run_command(
    study: Annotated[Path, typer.Argument(help="The study file (TOML) to run across the consortium.")],
    kit: Annotated[Path, typer.Option("--kit", help="The admin kit directory (kits/admin).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory on this machine for the run's identity and the report, model and metrics fetched from the server (per study name).")] = Path("runs"),
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Print every line of Flower's log, not only progress.")] = False,
    resume: Annotated[Path | None, typer.Option("--resume", help="Continue an interrupted run (its run directory here, e.g. runs/<study>) from the last round checkpointed on the server; same study file and run identity, next attempt.")] = None,
    retry: Annotated[Path | None, typer.Option("--retry", help="Start a run that failed before its first checkpoint (its run directory) again from round 1, under the same run identity (next attempt).")] = None,
    valid_hours: Annotated[float, typer.Option("--valid-hours", help="Sites admit the signed run for this many hours from now (at most 720).")] = 24.0,
) -> None:
    """Consortium admin: sign STUDY (with a new run identity and an expiry), submit it to the running server, stream progress, print the report."""
    import json

    from server.submit import submit_study

    def show(line: str) -> None:
        if verbose or any(word in line for word in ("ROUND", "round", "study", "ERROR", "error", "refuse")):
            console.print(line, style="dim")

    submission = submit_study(study, kit, out, on_line=show, resume=resume, retry=retry, valid_hours=valid_hours)  # raises with the report's reason unless completed
    if not submission.report_here:
        return  # the report stays on the server host; `show` printed where
    report = json.loads((submission.out_dir / "report.json").read_text())
    print_summary(report)


def partition_command(
    csv: Annotated[Path, typer.Argument(help="Molecule table (CSV) with a SMILES column and label column(s).")],
    by: Annotated[str, typer.Option("--by", help="scaffold (Bemis-Murcko groups kept whole), random, or dirichlet (label skew).")] = "scaffold",
    sites: Annotated[int, typer.Option("--sites", "-n", help="Number of simulated companies.")] = 4,
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory for the company CSVs, site files and study.toml.")] = Path("partition"),
    label: Annotated[list[str] | None, typer.Option("--label", help="Label column (repeat for multitask). Default: inferred.")] = None,
    task: Annotated[str | None, typer.Option("--task", help="binary, multitask or regression. Default: inferred from the labels.")] = None,
    smiles: Annotated[str | None, typer.Option("--smiles", help="SMILES column. Default: the column named 'smiles'.")] = None,
    alpha: Annotated[float, typer.Option("--alpha", help="Dirichlet concentration for --by dirichlet (smaller = more skew).")] = 0.5,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the split.")] = 0,
    name: Annotated[str | None, typer.Option("--name", help="Study name. Default: the --out directory's name.")] = None,
) -> None:
    """Split a molecule table into simulated companies and write a ready-to-run study.

    The study's defaults hold on large, imbalanced sets: mean pooling, 2 local epochs per round,
    the output bias at the pooled log-odds, and the round best on validation molecules carved from
    each company's training molecules (select_best).
    """
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
    console.print(Text.assemble("Study: ", (str(result.study), "bold"), f"  run it with: fedhelix simulate {result.study}"))


def status_command(
    kit: Annotated[Path, typer.Option("--kit", help="The admin kit directory (kits/admin).")],
    runs: Annotated[Path, typer.Option("--runs", help="Where this machine sees run directories (the --out of `fedhelix run`); the newest one's last round is shown.")] = Path("runs"),
) -> None:
    """Consortium admin: sites registered and online, runs and their status, and the newest run's last round, from any machine with the admin kit."""
    from server.status import consortium_status

    status = consortium_status(kit, runs)
    console.print(f"consortium '{status.kit.consortium}' via {status.kit.address}: {len(status.roster)} site(s) in the roster, {len(status.nodes)} node(s) registered, {status.online} online", soft_wrap=True)
    nodes = Table(title="nodes (flwr supernode ls)")
    for header in ("node id", "status", "online since"):
        nodes.add_column(header)
    for node in status.nodes:
        nodes.add_row(str(node.get("node-id")), str(node.get("status")), str(node.get("online-at") or ""))
    console.print(nodes)
    runs_table = Table(title="runs, newest first (flwr ls)")
    for header in ("run id", "status", "submitted", "finished"):
        runs_table.add_column(header)
    for run in status.runs:
        runs_table.add_row(str(run.get("run-id")), str(run.get("status")), str(run.get("pending-at") or ""), str(run.get("finished-at") or ""))
    console.print(runs_table)
    local = status.newest_local
    if local is None:
        console.print(f"no run directory under {runs} on this machine", soft_wrap=True)
        return
    means = ", ".join(f"{k} {v:.3f}" for k, v in local.mean.items()) or "no round finished yet"
    console.print(f"newest run directory {local.path}: {local.status}, round {local.rounds_done} done; mean over sites: {means}", soft_wrap=True)
