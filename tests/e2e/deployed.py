"""Helpers for tests that run a provisioned consortium on loopback: site files, nodes, processes."""

from __future__ import annotations

import json
import os
import socket
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import psutil

from client.privacy.ledger import PrivacyLedger
from shared.config import load_site
from shared.paths import PROJECT_ROOT

TCGA_REGIONS = PROJECT_ROOT / "data" / "tcga_brca" / "regions"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_site(directory: Path, name: str, data: str | None = None, budget: float = 10.0) -> Path:
    """A site file for a TCGA-BRCA region (``data``: another region's CSV), with its own ledger."""
    path = directory / f"{name}.toml"
    path.write_text(
        f'[site]\nname = "{name}"\n\n[data]\npath = "{TCGA_REGIONS / f"{data or name}.csv"}"\nlabel = "E"\ntime = "T"\ndrop = ["pid"]\n'
        f'split_column = "fold"\nmissing = "none"\n\n[privacy]\nledger = "ledgers/{name}.sqlite"\nepsilon_budget = {budget}\ndelta = 1e-5\n'
    )
    return path


def study_sites(sites: tuple[str, ...]) -> str:
    """The ``[[sites]]`` tables of a study whose site files sit beside it."""
    return "".join(f'\n[[sites]]\nname = "{s}"\nconfig = "{s}.toml"\n' for s in sites)


def start_node(kit: Path, site: Path, port: int, log: Path, env: dict[str, str] | None = None, extra: Sequence[str] = ()) -> subprocess.Popen:
    """``fedhelix node`` for one site, its output appended to ``log``."""
    command = [str(Path(sys.executable).parent / "fedhelix"), "node", "--kit", str(kit), "--site", str(site), "--port", str(port), *extra]
    return subprocess.Popen(command, stdout=log.open("ab"), stderr=subprocess.STDOUT, cwd=site.parent, env=env or dict(os.environ))


def kill_tree(pid: int) -> None:
    """SIGKILL a process and everything it started (a node's SuperNode, launcher and ClientApps; a server's ServerApp).

    Children in their own sessions are still found through their parent links.
    """
    try:
        parent = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    procs = [parent, *parent.children(recursive=True)]
    for proc in procs:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=30)


def ledger_rows(site_file: Path) -> list:
    """The site's privacy-ledger entries (empty when the ledger was never created)."""
    site = load_site(site_file)
    if site.privacy is None or not site.privacy.ledger.exists():
        return []
    ledger = PrivacyLedger(site.privacy.ledger, site.name)
    try:
        return list(ledger.entries)
    finally:
        ledger.close()


# `flwr run` that sends these FAB bytes as they are, instead of building them from the app's files
# (patched in the module flwr.cli.run.run, which its package's `run` function shadows as an attribute).
_RAW_FAB_RUN = (
    "import importlib, sys; from pathlib import Path; r = importlib.import_module('flwr.cli.run.run'); fab = Path(sys.argv.pop(1)).read_bytes(); "
    "r.build_fab_from_disk = lambda app: fab; from flwr.cli.app import app; sys.argv[0] = 'flwr'; app()"
)


def run_fab_as_is(admin_kit: Path, fab: bytes, run_config: Mapping[str, object], workdir: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """Submit exactly ``fab`` with exactly ``run_config`` (``--stream``, until the run ends): what a replaying or tampering sender can do.

    `fedhelix run` cannot send a ``.pyc`` (Flower's FAB rules drop it) nor an old signature; this can.
    """
    from server.admin_tunnel import control_home, load_admin_kit
    from server.deployment import CONNECTION, flower_env
    from server.submit import stage_app

    kit = load_admin_kit(admin_kit)
    workdir.mkdir(parents=True, exist_ok=True)
    app = stage_app(fab, workdir / "app")  # the CLI reads the app's pyproject.toml; the FAB sent is ``fab`` itself
    (workdir / "app.fab").write_bytes(fab)
    config = " ".join(f"{key}={json.dumps(value)}" for key, value in run_config.items())
    command = [sys.executable, "-c", _RAW_FAB_RUN, str(workdir / "app.fab"), "run", str(app), CONNECTION, "--stream", "--run-config", config]
    with control_home(kit, workdir) as home:  # through the admin listener, as `fedhelix run`
        return subprocess.run(command, env=flower_env(home), capture_output=True, text=True, timeout=timeout)


def site_error_text(site_file: Path) -> str:
    """The full error lines a node keeps beside its audit log (``SITE.errors.log``; empty when it refused nothing)."""
    from client.audit import audit_path
    from shared.errors import site_error_log

    name = load_site(site_file).name
    path = site_error_log(audit_path(name, site_file), name)
    return path.read_text(encoding="utf-8") if path.exists() else ""


def audit_entries(site_file: Path) -> list[dict]:
    """Every entry of a node's audit log (``SITE.audit.jsonl`` beside its site file)."""
    from client.audit import audit_path

    path = audit_path(load_site(site_file).name, site_file)
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def hazard_study(name: str, rounds: int, local_steps: int) -> str:
    """The [study] part of a deployed TCGA study: discrete-time hazard model, DP (epsilon 8) and SecAgg+."""
    return f"""
[study]
name = "{name}"
task = "survival"
model = "hazard"
rounds = {rounds}
strategy = "fedavg"
local_steps = {local_steps}
batch_size = 8
learning_rate = 0.1
seed = 7
secure_aggregation = true

[model]
time_bins = [365, 730, 1095, 1460, 1825, 2555, 3650]

[privacy]
dp = true
target_epsilon = 8.0
delta = 1e-5
max_grad_norm = 1.0
"""


def stop_nodes(nodes: dict[str, subprocess.Popen]) -> None:
    """SIGTERM every node, then wait for each (killing one that does not stop within 30 s)."""
    for proc in nodes.values():
        proc.send_signal(signal.SIGTERM)
    for proc in nodes.values():
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
