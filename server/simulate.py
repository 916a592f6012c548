"""Run a study as a simulated federation on this machine (Flower's Simulation Engine).

The researcher's entry point: every site of the study becomes a virtual
SuperNode running the real ClientApp on its own site file, the real ServerApp
coordinates them, and progress is shown live while Flower's own log goes to
``DIR/flower.log``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

from shared.config import StudyConfig, check_format, load_site_ref, load_study
from shared.contract import load_site_data
from shared.errors import FedhelixError, read_site_errors
from shared.flower_env import apply_flower_env

log = logging.getLogger("fedhelix")

CLIENT_APP_REF = "client.app:create_client_app"


def preflight(study: StudyConfig) -> list[str]:
    """Check every site file and its data locally before starting Ray; return one line per site."""
    lines = []
    for ref in study.sites:
        site = load_site_ref(ref, study.path)
        check_format(site, study.model)
        data = load_site_data(site, study.task, study.categories)
        what = f"{len(data.feature_names)} features" if site.data.format == "table" else f"molecules, {len(site.data.labels)} label(s)"
        lines.append(f"{site.name}: {data.n_train} train / {data.n_test} test, {what}")
    return lines


def _load_client_app_factory():
    """Load the ClientApp by reference string, as Flower does (server never imports client)."""
    import importlib

    module, attr = CLIENT_APP_REF.split(":")
    return getattr(importlib.import_module(module), attr)


class _QuietConsole(logging.Filter):
    """Keeps Flower's console handler to errors (Flower resets handler *levels*, not filters)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR


_QUIET = _QuietConsole()


def _route_flower_logs(out_dir: Path, verbose: bool) -> logging.Handler:
    """Send Flower's and our server log to DIR/flower.log; keep the console for progress."""
    flwr_logger = logging.getLogger("flwr")
    handler = logging.FileHandler(out_dir / "flower.log", mode="w")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    flwr_logger.addHandler(handler)
    logging.getLogger("fedhelix").addHandler(handler)
    logging.getLogger("fedhelix").setLevel(logging.INFO)
    if not verbose:  # Flower's own console handler, and root's (Flower's records propagate)
        for h in flwr_logger.handlers + logging.getLogger().handlers:
            if h is not handler:
                h.addFilter(_QUIET)
    return handler


def _unroute_flower_logs(handler: logging.Handler) -> None:
    for name in ("flwr", "fedhelix"):
        logging.getLogger(name).removeHandler(handler)
    for h in logging.getLogger("flwr").handlers + logging.getLogger().handlers:
        h.removeFilter(_QUIET)
    handler.close()


def simulate(
    study_path: str | Path | StudyConfig,
    out_dir: str | Path | None = None,
    *,
    verbose: bool = False,
    progress: bool = True,
    check: bool = True,
    echo: Callable[[str], None] = log.info,
    ledger_dir: str | Path | None = None,
    observe=None,
    resume: str | Path | None = None,
) -> dict:
    """Run the study; return the report dict. Raises :class:`FedhelixError` on a failed study.

    ``check`` validates every site locally first (a researcher has all site files);
    without it, a bad site is caught by the federated handshake instead.
    Privacy ledgers of a simulation live in ``DIR/ledgers`` (started afresh each
    run) unless ``ledger_dir`` names a directory to keep composing in; the sites'
    audit logs live in ``DIR/audit``. ``resume`` names the run directory of an
    interrupted run: the study continues from its last checkpointed round, with
    its ledgers and audit logs kept.
    """
    apply_flower_env()
    study = study_path if isinstance(study_path, StudyConfig) else load_study(study_path)
    if resume is not None:
        from server.checkpoint import load_checkpoint

        out_dir = resume
        load_checkpoint(Path(resume), study)  # refuse another study's checkpoint before starting anything
    out = Path(out_dir) if out_dir else Path("runs") / study.name
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    audit_dir = out / "audit"
    if ledger_dir is None:
        ledger_dir = out / "ledgers"
        if resume is None:
            shutil.rmtree(ledger_dir, ignore_errors=True)  # a simulated run's ledgers start empty
    if resume is None:
        shutil.rmtree(audit_dir, ignore_errors=True)
    if study.secure.enabled:  # structural SecAgg+ checks need no data: fail before Flower starts
        from server.secure_aggregation import derive_params

        derive_params(len(study.sites), study.secure.max_dropouts, study.update_bound, max_weight=1)
    if check:
        for line in preflight(study):
            echo(f"site check  {line}")

    # Heavy imports only once the inputs are known to be good.
    from flwr.simulation import run_simulation

    from server.app import create_server_app

    handler = _route_flower_logs(out, verbose)
    backend = {
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        "init_args": {"num_cpus": max(1, min(len(study.sites), os.cpu_count() or 1)), "include_dashboard": False, "logging_level": logging.ERROR, "log_to_driver": verbose},
    }
    for stale in ("report.json", "report.html", "model.pt"):  # never mistake an old run's result for this one's
        (out / stale).unlink(missing_ok=True)
    stop = threading.Event()
    watcher = threading.Thread(target=_show_progress, args=(out / "metrics.jsonl", study, stop), daemon=True) if progress else None
    try:
        if watcher:
            watcher.start()
        run_simulation(
            server_app=create_server_app(study, out, observe, resume=resume is not None),
            client_app=_load_client_app_factory()(study, str(ledger_dir), str(audit_dir)),  # the study every simulated site approved
            num_supernodes=len(study.sites),
            backend_config=backend,
            verbose_logging=verbose,
        )
    except SystemExit as exc:  # Flower exits the process on some failures; keep ours readable
        log.debug("flower exited with %s", exc.code)
    except Exception as exc:  # noqa: BLE001 - the report below says what went wrong
        log.debug("simulation raised: %s", exc)
    finally:
        stop.set()
        if watcher:
            watcher.join(timeout=5)
        _unroute_flower_logs(handler)
    report_path = out / "report.json"
    if not report_path.exists():
        raise FedhelixError(f"the simulation ended without a report; see {out / 'flower.log'}")
    report = json.loads(report_path.read_text())
    report["run_dir"] = str(out)
    if report["status"] != "completed":
        # The coordinator saw only the sites' error codes; the researcher is every site's IT here.
        details = read_site_errors(audit_dir)
        at_sites = f" | at the sites: {' | '.join(details[-3:])}" if details else ""
        raise FedhelixError(f"study '{study.name}' failed: {report['error']}{at_sites} (report: {out / 'report.html'})")
    return report


def _show_progress(metrics_path: Path, study: StudyConfig, stop: threading.Event) -> None:
    """Follow metrics.jsonl and draw a progress bar with the latest mean metric."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from shared.metrics import PRIMARY

    primary, _ = PRIMARY[study.task]
    seen = 0
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} rounds"), TextColumn("{task.fields[metric]}"), TimeElapsedColumn(), transient=False) as bar:
        task = bar.add_task(f"{study.name}", total=study.rounds, metric="starting Flower...")
        while True:
            lines = metrics_path.read_text().splitlines() if metrics_path.exists() else []
            for line in lines[seen:]:
                entry = json.loads(line)
                value = entry["evaluate"]["mean"].get(primary)
                shown = f"mean {primary} {value:.3f}" if value is not None else f"mean {primary} n/a"
                bar.update(task, completed=entry["round"], metric=shown)
            seen = len(lines)
            if stop.is_set() or seen >= study.rounds:
                break
            time.sleep(0.3)
