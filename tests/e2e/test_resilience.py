"""Operations under faults, in Flower's simulation: bad updates, a failing site, a killed coordinator.

* a site sending NaN, Inf or a 1000x-norm update (secure aggregation off) is
  rejected, the round goes on with the others, the model stays finite and the
  report names the site; a site that crashes mid-study is listed as failed;
* a simulation killed with SIGKILL after a round and resumed with ``--resume``
  ends with exactly the metrics and model of an uninterrupted run;
* every site's audit log is intact afterwards and holds every reply it sent.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import server.simulate as simulate_module
from client.audit import verify
from server.checkpoint import CHECKPOINT_FILE, load_checkpoint
from server.simulate import simulate
from shared.config import load_study

pytestmark = pytest.mark.e2e

SITES = ("hospital_a", "hospital_b", "hospital_c")


def wdbc_study(root: Path, where: Path, *, rounds: int, strategy: str = "fedadam", extra: str = "", name: str = "wdbc-ops") -> Path:
    where.mkdir(parents=True, exist_ok=True)
    sites = "".join(f'\n[[sites]]\nname = "{s}"\nconfig = "{root / "studies" / "wdbc" / "sites" / f"{s}.toml"}"\n' for s in SITES)
    (where / "study.toml").write_text(
        f"""
[study]
name = "{name}"
task = "binary"
model = "mlp"
rounds = {rounds}
strategy = "{strategy}"
local_steps = 10
batch_size = 32
learning_rate = 0.05
server_learning_rate = 0.05
seed = 7
secure_aggregation = false
{extra}
[model]
hidden = [16]
{sites}"""
    )
    return where / "study.toml"


def faulty_client_factory(faults: dict[tuple[int, int], str]):
    """The real ClientApp with a mod that corrupts or crashes chosen (site index, round) replies.

    Built from closures on purpose: the simulation ships the app to its workers
    by value, so nothing here has to be importable there.
    """

    def factory(study, ledger_dir: str, audit_dir: str):
        import flwr.compat.common.recorddict_compat as compat
        from flwr.app import Message
        from flwr.app.message_type import MessageType
        from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays

        from client.app import create_client_app

        def corrupt(msg, ctxt, call_next):
            if msg.metadata.message_type != MessageType.TRAIN:
                return call_next(msg, ctxt)
            fault = faults.get((int(ctxt.node_config["partition-id"]), int(msg.metadata.group_id)))
            if fault == "crash":
                raise RuntimeError("injected fault: the site's process crashed")
            reply = call_next(msg, ctxt)
            if fault is None or reply.has_error():
                return reply
            fitres = compat.recorddict_to_fitres(reply.content, keep_input=True)
            arrays = parameters_to_ndarrays(fitres.parameters)
            if fault == "nan":
                arrays[0] = np.full_like(arrays[0], np.nan)
            elif fault == "inf":
                arrays[-1] = np.full_like(arrays[-1], np.inf)
            elif fault == "huge":
                arrays = [a * 1000 for a in arrays]
            fitres.parameters = ndarrays_to_parameters(arrays)
            return Message(compat.fitres_to_recorddict(fitres, keep_input=True), reply_to=msg)

        return create_client_app(study, ledger_dir, audit_dir, mods=[corrupt])

    return factory


def test_bad_updates_are_rejected_and_a_crashed_site_is_dropped(root: Path, tmp_path: Path, monkeypatch) -> None:
    faults = {(0, 1): "nan", (1, 2): "inf", (2, 3): "huge", (0, 4): "crash"}
    monkeypatch.setattr(simulate_module, "_load_client_app_factory", lambda: faulty_client_factory(faults))
    study = wdbc_study(root, tmp_path / "study", rounds=5, strategy="fedavg", extra="min_sites = 2\n[robustness]\nmax_update_norm = 10.0\n")

    report = simulate(study, tmp_path / "run", progress=False)

    assert report["status"] == "completed" and [r["round"] for r in report["rounds"]] == [1, 2, 3, 4, 5]
    got = [(f["round"], f["site"], f["kind"]) for f in report["failures"]]
    assert got == [(1, "hospital_a", "rejected"), (2, "hospital_b", "rejected"), (3, "hospital_c", "rejected"), (4, "hospital_a", "failed")]
    reasons = [f["reason"] for f in report["failures"]]
    assert "NaN or Inf" in reasons[0] and "NaN or Inf" in reasons[1]
    assert "exceeds the study's max_update_norm 10" in reasons[2]
    assert report["failures"][3]["phase"] == "train" and reasons[3]  # Ray wraps a crash; the kind and round say enough
    for r in report["rounds"]:  # each faulty round aggregated exactly the two healthy sites
        expected = {s for s in SITES if (r["round"], s) not in {(f[0], f[1]) for f in got}}
        assert set(r["fit"]["sites"]) == expected
    saved = torch.load(tmp_path / "run" / "model.pt", weights_only=False)
    assert all(torch.isfinite(t).all() for t in saved["state_dict"].values())
    assert report["final"]["mean"]["roc_auc"] > 0.9  # the rejected updates did not poison the model
    page = (tmp_path / "run" / "report.html").read_text()
    assert "max_update_norm" in page and "hospital_c" in page
    # The audit logs hold what the sites themselves sent (before the injected corruption on the wire).
    audit = verify(tmp_path / "run" / "audit" / "hospital_a.audit.jsonl")
    assert audit.kinds == {"handshake": 1, "update": 4, "metrics": 5, "error": 1}  # round 4 crashed: only its sealed error left


def _run_cli(*args: str, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "fedhelix.cli", "simulate", *args], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def test_killed_simulation_resumes_to_the_same_result_as_an_uninterrupted_run(root: Path, tmp_path: Path) -> None:
    rounds = 8
    study = wdbc_study(root, tmp_path / "study", rounds=rounds)
    reference = simulate(study, tmp_path / "reference", progress=False)

    # SIGKILL the whole simulation (coordinator, Ray workers) once round 2 is checkpointed.
    run = tmp_path / "interrupted"
    proc = _run_cli(str(study), "--out", str(run), cwd=tmp_path)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if (run / CHECKPOINT_FILE).exists() and load_checkpoint(run, load_study(study)).round >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()[0][-2000:]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    done = load_checkpoint(run, load_study(study)).round
    assert 2 <= done < rounds and not (run / "report.json").exists()

    resumed = _run_cli(str(study), "--resume", str(run), cwd=tmp_path)
    output = resumed.communicate(timeout=400)[0]
    assert resumed.returncode == 0, output[-2000:]
    report = json.loads((run / "report.json").read_text())
    assert [r["round"] for r in report["rounds"]] == list(range(1, rounds + 1))
    assert report["final"] == reference["final"]  # equal, not approximately equal
    assert [r["evaluate"] for r in report["rounds"]] == [r["evaluate"] for r in reference["rounds"]]
    a = torch.load(run / "model.pt", weights_only=False)["state_dict"]
    b = torch.load(tmp_path / "reference" / "model.pt", weights_only=False)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert len((run / "metrics.jsonl").read_text().splitlines()) == rounds
    # The sites' audit logs survived the kill intact; the replayed rounds appear as new entries.
    for site in SITES:
        summary = verify(run / "audit" / f"{site}.audit.jsonl")
        assert summary.kinds["update"] >= rounds and summary.kinds["handshake"] == 2

    # A checkpoint is refused for another study, in one line.
    other = wdbc_study(root, tmp_path / "other", rounds=rounds, name="another-study")
    refused = _run_cli(str(other), "--resume", str(run), cwd=tmp_path)
    text = refused.communicate(timeout=120)[0]
    assert refused.returncode == 2 and "Traceback" not in text
    assert "belongs to study 'wdbc-ops'" in " ".join(text.split())
