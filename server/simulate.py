"""Run a study as a simulated federation on this machine (Flower's Simulation Engine).

The researcher's entry point: every site of the study becomes a virtual
SuperNode running the real ClientApp on its own site file, the real ServerApp
coordinates them, and progress is shown live while Flower's own log goes to
``DIR/flower.log``.

A failure of Flower's Simulation Runtime or of Ray ends the simulation within
seconds: Flower runs the ServerApp in a non-daemon thread that waits for the
sites' replies without a timeout, so once the runtime is gone the driver tells
that thread (:class:`_RuntimeLink`), the study fails with its report written and
the thread ends; nothing is left to keep the process alive.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from shared.config import StudyConfig, check_format, load_site_ref, load_study
from shared.contract import load_site_data
from shared.errors import FedhelixError, read_site_errors
from shared.flower_env import apply_flower_env

log = logging.getLogger("fedhelix")

CLIENT_APP_REF = "client.app:create_client_app"
RAY_ADDRESS_ENV = "RAY_ADDRESS"
RAY_CONNECT_TIMEOUT_S = 3.0  # a Ray head answers a TCP connect at once; ray.init itself retries for minutes
SERVER_STOP_TIMEOUT_S = 30.0  # the ServerApp needs one poll interval and a report write once told to stop


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
    """Keeps Flower's and the server's records off the console (Flower resets handler *levels*, not filters).

    Everything, errors and their tracebacks included, is in ``DIR/flower.log``;
    the console shows progress and, on failure, the one line the CLI prints.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return False


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


def ray_address() -> str | None:
    """The Ray cluster ``RAY_ADDRESS`` names, as Ray itself reads it; None when Ray starts locally."""
    address = os.environ.get(RAY_ADDRESS_ENV, "").strip()
    return None if address in ("", "local") else address


def check_ray_address(address: str) -> None:
    """Refuse, in one line, a Ray address nothing answers at (ray.init would retry for minutes).

    ``auto`` (the cluster this machine's ``ray start`` recorded) is left to Ray.
    """
    if address == "auto":
        return
    hostport = address.removeprefix("ray://")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        host, port = hostport, "10001" if address.startswith("ray://") else "6379"  # Ray's default ports
    try:
        with socket.create_connection((host, int(port)), timeout=RAY_CONNECT_TIMEOUT_S):
            pass
    except OSError as err:
        reason = err.strerror or str(err) or type(err).__name__
        raise FedhelixError(
            f"cannot reach the Ray cluster at {address}: {reason} ({RAY_ADDRESS_ENV}); start it, or unset {RAY_ADDRESS_ENV} to simulate on a Ray of this machine"
        ) from None


def _backend_config(n_sites: int, verbose: bool, address: str | None) -> dict[str, Any]:
    """Flower's Ray backend settings. Ray refuses ``num_cpus`` when joining an existing cluster: it has its own."""
    init_args: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.ERROR, "log_to_driver": verbose}
    if address is None:
        init_args["num_cpus"] = max(1, min(n_sites, os.cpu_count() or 1))
    return {"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": init_args}


class _RuntimeLink:
    """What the driver thread tells Flower's ServerApp thread: the Simulation Runtime has ended.

    Flower 1.42 starts the ServerApp in a non-daemon thread and gives no way to
    stop it; the grid it hands over waits for replies without a timeout. When the
    runtime or Ray dies, those replies never come: the thread, and the process
    with it, would wait forever. Once told, every wait of the grid raises, so the
    study fails with its report written and the thread returns.
    """

    def __init__(self) -> None:
        self._ended = threading.Event()
        self._cause = ""
        self.server_done = threading.Event()

    def end(self, cause: str) -> None:
        if not self._ended.is_set():
            self._cause = cause
            self._ended.set()

    def check(self) -> None:
        """Raise once the runtime has ended: no reply can come any more."""
        if self._ended.is_set():
            raise FedhelixError(f"the simulation runtime stopped: {self._cause}")

    def guard(self, grid: Any) -> None:
        """Make ``grid``'s polls (replies, connected nodes) fail once the runtime has ended.

        Only the instance's two polling methods are wrapped: its class stays
        Flower's ``InMemoryGrid``, which the ServerApp tunes for simulation.
        """
        for name in ("pull_messages", "get_node_ids"):
            poll = getattr(grid, name)

            def checked(*args: Any, _poll: Callable[..., Any] = poll, **kwargs: Any) -> Any:
                self.check()
                return _poll(*args, **kwargs)

            setattr(grid, name, checked)


def _linked_server_app(app: Any, link: _RuntimeLink) -> Any:
    """Wrap the study's ServerApp so that it stops with the runtime and says when it is done."""
    from flwr.app import Context
    from flwr.serverapp import Grid, ServerApp

    linked = ServerApp()

    @linked.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            link.guard(grid)
            app(grid, context)
        finally:
            link.server_done.set()

    return linked


def _root_cause(exc: BaseException) -> str:
    """The innermost exception of Flower's wrapped chain, in one line ("Simulation Runtime crashed" says nothing)."""
    while (inner := exc.__cause__ or exc.__context__) is not None and inner is not exc:
        exc = inner
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _shutdown_ray() -> None:
    """Disconnect from Ray (and stop the local Ray this process started) if Flower's teardown did not."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()


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
    address = ray_address()
    if address is not None:
        check_ray_address(address)
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
    backend = _backend_config(len(study.sites), verbose, address)
    for stale in ("report.json", "report.html", "model.pt"):  # never mistake an old run's result for this one's
        (out / stale).unlink(missing_ok=True)
    stop = threading.Event()
    watcher = threading.Thread(target=_show_progress, args=(out / "metrics.jsonl", study, stop), daemon=True) if progress else None
    link = _RuntimeLink()
    cause = "the Simulation Runtime ended"
    try:
        if watcher:
            watcher.start()
        run_simulation(
            server_app=_linked_server_app(create_server_app(study, out, observe, resume=resume is not None), link),
            client_app=_load_client_app_factory()(study, str(ledger_dir), str(audit_dir)),  # the study every simulated site approved
            num_supernodes=len(study.sites),
            backend_config=backend,
            verbose_logging=verbose,
        )
    except SystemExit as exc:  # Flower exits on some failures; Ray turns a SIGTERM into one
        cause = f"Flower's runtime exited (code {exc.code})"
        log.error("simulation exited: %s", cause)
    except Exception as exc:  # noqa: BLE001 - the report below says what went wrong
        cause = _root_cause(exc)
        log.error("simulation raised: %s", cause, exc_info=exc)
    finally:
        link.end(cause)  # a ServerApp still waiting for replies fails its study now and returns
        server_done = link.server_done.wait(SERVER_STOP_TIMEOUT_S)
        _shutdown_ray()
        stop.set()
        if watcher:
            watcher.join(timeout=5)
        _unroute_flower_logs(handler)
    report_path = out / "report.json"
    if not report_path.exists():
        what = cause if server_done else f"{cause}; the coordinator did not stop within {SERVER_STOP_TIMEOUT_S:g} s"
        raise FedhelixError(f"the simulation ended without a report: {what}; see {out / 'flower.log'}")
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
    with Progress(TextColumn("{task.description}", style="bold", markup=False), BarColumn(), TextColumn("{task.completed}/{task.total} rounds"), TextColumn("{task.fields[metric]}", markup=False), TimeElapsedColumn(), transient=False) as bar:
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
