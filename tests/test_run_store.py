"""A deployed run's directory on the server host: the server's runs directory and the signed nonce, never an admin's path."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.deployment import load_server_kit
from server.provision import ConsortiumConfig, provision
from server.run_store import RUNS_ENV, deployed_run_dir, runs_dir_from_env, study_dirname
from shared.approval import NONCE_KEY
from shared.errors import FedhelixError

NONCE = "0123456789abcdef0123456789abcdef"


def test_a_deployed_run_writes_under_the_runs_directory_whatever_out_says(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    out, resumes = deployed_run_dir(runs, {NONCE_KEY: NONCE, "out": "/etc"}, "tcga")
    assert (out, resumes) == (runs / "tcga" / NONCE, False)
    assert deployed_run_dir(runs, {NONCE_KEY: NONCE, "resume": NONCE}, "tcga") == (runs / "tcga" / NONCE, True)
    assert deployed_run_dir(runs, {NONCE_KEY: NONCE, "resume": "/home/admin/runs/tcga"}, "tcga") == (runs / "tcga" / NONCE, True)  # an older admin: still this run
    escaped, _ = deployed_run_dir(runs, {NONCE_KEY: NONCE}, "../../etc")
    assert escaped.resolve().is_relative_to(runs.resolve()) and study_dirname("a/../b") == "a_.._b"
    (out / "report.json").parent.mkdir(parents=True)
    (out / "report.json").write_text('{"status": "completed"}')  # a completed run's config sent again: written beside, never over it
    again, resumes = deployed_run_dir(runs, {NONCE_KEY: NONCE}, "tcga")
    assert again.parent == out.parent and again.name.startswith(f"{NONCE}.again-") and not resumes
    assert deployed_run_dir(runs, {NONCE_KEY: NONCE, "resume": NONCE}, "tcga") == (out, True)
    with pytest.raises(FedhelixError, match="resume names run f{32}, but this run's identity"):
        deployed_run_dir(runs, {NONCE_KEY: NONCE, "resume": "f" * 32}, "tcga")
    with pytest.raises(FedhelixError, match="no valid run identity"):
        deployed_run_dir(runs, {NONCE_KEY: "../x", "out": "/tmp"}, "tcga")


def test_the_server_kit_names_its_runs_directory(tmp_path: Path) -> None:
    provision(ConsortiumConfig(name="r", server_address="127.0.0.1:8000", sites=("a",)), tmp_path)
    kit = load_server_kit(tmp_path / "server")
    assert kit.runs_dir == tmp_path / "server" / "runs"
    toml = tmp_path / "server" / "server.toml"
    assert 'runs = "runs"' in toml.read_text()
    toml.write_text(toml.read_text().replace('runs = "runs"', 'runs = "/srv/fedhelix-runs"'))
    assert load_server_kit(tmp_path / "server").runs_dir == Path("/srv/fedhelix-runs")
    assert runs_dir_from_env({RUNS_ENV: "/srv/x"}) == Path("/srv/x") and runs_dir_from_env({}) is None
