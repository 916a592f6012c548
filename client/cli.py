"""Commands of a hospital's IT team."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from shared.config import load_site, load_study
from shared.contract import load_site_data
from shared.errors import ConfigError
from shared.terminal import plain_console, tagged

console = plain_console()  # prints file paths, fixes and [sections] as written


def check_site_command(
    site: Annotated[Path, typer.Argument(help="The site file (TOML) describing this hospital's data.")],
    study: Annotated[Path | None, typer.Option("--study", help=escape("Also check the labels against this study's task and the categorical levels its [data.categories] agrees. Without it only the task-independent checks run."))] = None,
) -> None:
    """Check the site's data against the contract, locally; nothing is sent anywhere."""
    config = load_site(site)
    if study is not None:
        s = load_study(study)
        task, categories = s.task, s.categories
        scope = f"{task} task of study '{s.name}'"
    else:  # a site serves several studies of several tasks: no guess at one
        task, categories = None, {}
        scope = "task-independent checks only; give --study to check labels against a study's task"
    data = load_site_data(config, task, categories)
    console.print(tagged("OK", "green", f"site '{config.name}': {data.n_train} train / {data.n_test} test rows, {len(data.feature_names)} features ({scope})"))
    if config.data.tables:
        console.print(f"  {len(config.data.tables)} tables joined on the patient id; {len(data.omics_features)} omics features ({data.join_dropped} patient(s) dropped by the join)")
    for warning in data.warnings:
        console.print(tagged("warning", "yellow", warning))


def ledger_show_command(
    site: Annotated[Path, typer.Argument(help="The site file whose [privacy] ledger to show.")],
    accountant: Annotated[str, typer.Option(help="Accountant used to compose the history: rdp or prv.")] = "rdp",
) -> None:
    """Show every DP round this site's data was used for, epsilon spent and budget left."""
    from client.audit import audit_path, dp_rounds
    from client.privacy.ledger import PrivacyLedger

    config = load_site(site)
    if config.privacy is None:
        raise ConfigError(f"site file {config.path} has no [privacy] section (ledger, epsilon_budget)")
    audit = audit_path(config.name, config.path)
    if not config.privacy.ledger.exists() and not dp_rounds(audit, config.name):
        console.print(f"site '{config.name}': no ledger yet at {config.privacy.ledger} (nothing spent; it is created on first use)")
        return
    # verified under its key; missing or shorter than the DP rounds the audit log records is an error
    ledger = PrivacyLedger(config.privacy.ledger, config.name, config.privacy.ledger_key, audit_log=audit, readonly=True)
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


def approve_command(
    study: Annotated[Path, typer.Argument(help="The study file (TOML) the consortium asks this site to take part in.")],
    site: Annotated[Path, typer.Option("--site", help="This hospital's site file (TOML).")],
    code_digest: Annotated[str | None, typer.Option("--code-digest", help="Approve this code digest (from the release notes) instead of this installation's own code.")] = None,
    runs: Annotated[int, typer.Option("--runs", min=1, help="How many runs of this study (each `fedhelix run` is a new one) the node admits under this approval.")] = 1,
    resumes: Annotated[int, typer.Option("--resumes", min=1, help="Attempts per run: the first plus the admin's `--resume`/`--retry` of it.")] = 3,
) -> None:
    """Record this site's approval of STUDY with this version of the fedhelix code, for --runs runs.

    The node will train only on study files and code the site approved: a changed study file
    or a changed line of code needs a new approval. Each signed run is admitted once; a replay
    of its signed config as a new run, or more runs than approved, is refused.
    """
    from client.approval import approvals_path, approve
    from shared.approval import code_digest_of_project
    from shared.paths import PROJECT_ROOT

    config = load_site(site)
    s = load_study(study)
    if config.name not in [ref.name for ref in s.sites]:
        raise ConfigError(f"study '{s.name}' ({study}) does not list site '{config.name}'; nothing approved")
    task_data = load_site_data(config, s.task, s.categories)  # the site's data fits this study
    digest = code_digest or code_digest_of_project(PROJECT_ROOT)
    record = approve(study, config, digest, runs=runs, resumes=resumes)
    console.print(tagged("approved", "green", f"study '{record.study}' for site '{config.name}' ({task_data.n_train} train / {task_data.n_test} test rows)"))
    console.print(f"  {record.runs} run(s), {record.resumes} attempt(s) each (first + resumes)")
    console.print(f"  study sha256 {record.study_sha256}\n  code  sha256 {record.code_sha256}\n  recorded in {approvals_path(config)}")
    if s.privacy.dp and config.privacy is not None:
        console.print(f"  DP: the study targets epsilon {s.privacy.target_epsilon:g}; this site's budget is {config.privacy.epsilon_budget:g}")


def node_command(
    kit: Annotated[Path, typer.Option("--kit", help="This site's kit directory from the consortium admin (kits/<site>).")],
    site: Annotated[Path, typer.Option("--site", help="This hospital's site file (TOML): where the data lives and what it means.")],
    port: Annotated[int, typer.Option("--port", help="Local port of the node's own Runtime API (loopback; distinct per node on one host).")] = 9094,
    stock: Annotated[bool, typer.Option("--stock", help="Run Flower's stock SuperNode (fresh ClientApp process per message, 3 s polls) instead of the warm launcher with short polls.")] = False,
    rejoin_wait: Annotated[float | None, typer.Option("--rejoin-wait", help="Seconds to keep retrying when the server does not activate this node: after a crash it keeps the old session online for up to a minute. Default 75; 0 = give up at once.")] = None,
    proxy: Annotated[str | None, typer.Option("--proxy", help="Outbound HTTP proxy (http://[USER:PASSWORD@]HOST:PORT) to reach the server through with CONNECT; TLS stays end to end. Default: https_proxy / HTTPS_PROXY unless NO_PROXY names the server.")] = None,
) -> None:
    """Hospital IT: check everything locally, then run this site's node (outbound TLS to the server only)."""
    from client.node import REJOIN_WAIT_S, prepare_node, run_node

    plan = prepare_node(kit, site, port=port, fast=not stock, rejoin_wait_s=REJOIN_WAIT_S if rejoin_wait is None else rejoin_wait, proxy=proxy)
    approved = read_approvals_count(plan.approvals)
    console.print(tagged("OK", "green", f"kit, certificates, server TLS and site data checked for site '{plan.site.name}'"))
    console.print(f"node dials {plan.kit.server_address}; {approved} approved stud{'y' if approved == 1 else 'ies'} in {plan.approvals}; privacy ledger {plan.ledger or 'none (no [privacy] section: DP studies will be refused)'}")
    console.print(f"  outbound: {plan.kit.server_address} {plan.route.describe()}", markup=False, soft_wrap=True)
    raise typer.Exit(run_node(plan))


def read_approvals_count(path: Path) -> int:
    from client.approval import read_approvals

    return len(read_approvals(path))
def audit_verify_command(
    log: Annotated[Path, typer.Argument(help="The site's audit log (SITE.audit.jsonl).")],
) -> None:
    """Check the audit log's hash chain: any edited, removed or reordered entry is an error (exit 2)."""
    from client.audit import verify

    summary = verify(log)
    kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(summary.kinds.items())) or "no messages"
    console.print(
        tagged(
            "OK",
            "green",
            f"{summary.path}: {summary.entries} entries intact ({kinds}); "
            f"site(s) {', '.join(summary.sites) or '-'}; studies {', '.join(summary.studies) or '-'}; head {summary.head}",
        )
    )
