"""`fedhelix simulate` never hangs: when Ray or Flower's runtime fails, it ends within seconds in one line.

Each case runs the real CLI in its own session (so every process it starts,
Ray's included, can be found and must be gone afterwards): an unreachable
RAY_ADDRESS, a real running Ray cluster in RAY_ADDRESS, and the simulation's
own Ray stopped from outside while it starts.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.e2e

BOUND_S = 60.0  # "within seconds", generously: two shared CPUs
RAY_BIN = Path(sys.executable).parent / "ray"


def _study(root: Path, tmp_path: Path, rounds: int = 2) -> Path:
    """The WDBC study, shortened to ``rounds`` rounds, in tmp_path (site files used in place)."""
    sites = root / "studies" / "wdbc" / "sites"
    text = (root / "studies" / "wdbc" / "study.toml").read_text()
    text = text.replace("rounds = 10", f"rounds = {rounds}").replace('config = "sites/', f'config = "{sites}/')
    path = tmp_path / "study.toml"
    path.write_text(text)
    return path


def _start(study: Path, out: Path, **env: str) -> subprocess.Popen:
    """`fedhelix simulate` in a new session: its session id finds every process it leaves."""
    return subprocess.Popen(
        [sys.executable, "-m", "fedhelix.cli", "simulate", str(study), "--out", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **env},
        start_new_session=True,
    )


def _session(sid: int) -> list[psutil.Process]:
    """Live processes of session ``sid`` (Ray's daemons outlive their parent there)."""
    found = []
    for proc in psutil.process_iter():
        try:
            if os.getsid(proc.pid) == sid and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (ProcessLookupError, psutil.Error):
            pass
    return found


def _kill_session(sid: int) -> None:
    """Clean up after a failed assertion: only this test's own session is touched."""
    for proc in _session(sid):
        try:
            proc.kill()
        except psutil.Error:
            pass


def _finish(proc: subprocess.Popen, started: float) -> tuple[int, str, str, float]:
    """Exit code, stdout, stderr and seconds since ``started``; fails (and kills) past the bound."""
    try:
        out, err = proc.communicate(timeout=max(1.0, BOUND_S - (time.monotonic() - started)))
    except subprocess.TimeoutExpired:
        _kill_session(proc.pid)
        proc.communicate()
        pytest.fail(f"fedhelix simulate still running {BOUND_S:g} s after the failure")
    return proc.returncode, out, err, time.monotonic() - started


def _assert_nothing_left(sid: int) -> None:
    """No process of the run's session and no child of this test outlives the run (Ray gets a few seconds)."""
    deadline = time.monotonic() + 15
    while (left := _session(sid) + psutil.Process().children(recursive=True)) and time.monotonic() < deadline:
        time.sleep(0.5)
    names = [f"{p.pid}:{p.name()}" for p in left if p.is_running()]
    _kill_session(sid)
    assert not names, f"processes left behind: {names}"


def _one_error_line(stderr: str) -> str:
    """The single line the CLI prints for a failure: no traceback, no Flower log."""
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and errors[0] == lines[-1], stderr
    return errors[0]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_unreachable_ray_address_is_refused_before_anything_starts(root: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    started = time.monotonic()
    proc = _start(_study(root, tmp_path), out, RAY_ADDRESS="127.0.0.1:1")
    code, _, stderr, elapsed = _finish(proc, started)
    line = _one_error_line(stderr)
    assert code == 2, stderr
    assert "cannot reach the Ray cluster at 127.0.0.1:1" in line
    assert elapsed < BOUND_S
    assert not (out / "report.json").exists()
    _assert_nothing_left(proc.pid)


@pytest.fixture
def ray_cluster() -> Iterator[str]:
    """A throwaway `ray start --head` on a free port with its own temp dir, stopped by its session id.

    (`ray stop` would stop every Ray on the machine, other people's too.)
    """
    port = _free_port()
    temp_dir = tempfile.mkdtemp(prefix="rayt", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    start = subprocess.Popen(
        [str(RAY_BIN), "start", "--head", f"--port={port}", f"--temp-dir={temp_dir}", "--num-cpus=2", "--include-dashboard=false", "--disable-usage-stats"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = start.communicate(timeout=120)
        assert start.returncode == 0, output
        yield f"127.0.0.1:{port}"
    finally:
        if start.poll() is None:
            start.kill()
        _kill_session(start.pid)
        psutil.wait_procs(_session(start.pid), timeout=10)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_running_ray_cluster_in_ray_address_is_joined_and_the_run_ends(root: Path, tmp_path: Path, ray_cluster: str) -> None:
    out = tmp_path / "run"
    started = time.monotonic()
    proc = _start(_study(root, tmp_path), out, RAY_ADDRESS=ray_cluster)
    code, stdout, stderr, elapsed = _finish(proc, started)
    assert code == 0, stderr
    assert "error:" not in stderr and "Traceback" not in stderr
    assert json.loads((out / "report.json").read_text())["status"] == "completed"
    assert "final global model" in stdout
    assert elapsed < BOUND_S
    _assert_nothing_left(proc.pid)  # the driver left; the cluster (another session) keeps running


def _stop_ray_of(sid: int) -> None:
    """What `ray stop` does, to this run's Ray only: SIGTERM the raylet, then the other Ray processes, then the GCS."""
    driver = psutil.Process(sid)
    ray_procs = [p for p in _session(sid) if p.pid != sid]
    raylet = [p for p in ray_procs if p.name() == "raylet"]
    gcs = [p for p in ray_procs if p.name() == "gcs_server"]
    for bucket in (raylet, [p for p in ray_procs if p not in raylet + gcs], gcs):
        for proc in bucket:
            try:
                proc.terminate()
            except psutil.Error:
                pass
        psutil.wait_procs(bucket, timeout=5)
    assert driver.is_running()


def test_ray_stopped_from_outside_ends_the_run_with_a_failed_report(root: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = _start(_study(root, tmp_path), out)
    deadline = time.monotonic() + 120
    while not any(p.name() == "raylet" for p in _session(proc.pid)):
        assert proc.poll() is None and time.monotonic() < deadline, "the simulation never started its Ray"
        time.sleep(0.2)
    started = time.monotonic()
    _stop_ray_of(proc.pid)  # while Ray starts up: Flower's runtime crashes with the ServerApp waiting
    code, _, stderr, elapsed = _finish(proc, started)
    line = _one_error_line(stderr)
    assert code == 2, stderr
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "failed" and "failed" in line and str(out) in line
    assert elapsed < BOUND_S
    _assert_nothing_left(proc.pid)
