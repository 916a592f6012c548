"""Privacy as a contract, proven on whole simulated studies (real Flower, real Opacus accounting)."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

import pytest

from shared.accounting import epsilon
from client.privacy.budget import plan_dp_round
from client.privacy.ledger import PrivacyLedger
from server.simulate import simulate
from shared.config import load_site, load_study
from shared.errors import FedhelixError
from shared.plan import TrainingPlan

pytestmark = pytest.mark.e2e


def _dp_wdbc(root: Path, tmp_path: Path, budgets: dict[str, float], rounds: int = 3, min_sites: int = 0) -> Path:
    """A copy of the WDBC DP study with short rounds and the given site budgets."""
    base = tmp_path / "wdbc"
    shutil.copytree(root / "studies" / "wdbc", base)
    for path in (base / "sites").glob("*.toml"):
        text = path.read_text().replace("../../../data/wdbc", str(root / "data" / "wdbc"))
        budget = budgets.get(path.stem, 10.0)
        path.write_text(re.sub(r"epsilon_budget = [0-9.]+", f"epsilon_budget = {budget}", text))
    study = base / "study-dp.toml"
    text = study.read_text().replace("rounds = 10", f"rounds = {rounds}").replace("local_steps = 20", "local_steps = 10")
    # Three sites under SecAgg+ tolerate no dropout (a dropout halts the round): a study that goes on
    # without a site uses plain FedAvg of the DP updates.
    secure = "" if not min_sites else "\nsecure_aggregation = false"
    study.write_text(text.replace("seed = 42", f"seed = 42\nmin_sites = {min_sites}{secure}"))
    return study


def _epsilon_path(study_path: Path, site: str) -> list[float]:
    """epsilon after each planned round at a site, computed independently of the client code path."""
    study = load_study(study_path)
    ref = next(s for s in study.sites if s.name == site)
    config = load_site(ref.config)
    from shared.contract import load_site_data

    data = load_site_data(config, study.task)
    dp = plan_dp_round(TrainingPlan.from_study(study), config, data.n_train)
    return [epsilon([dp.step] * r, dp.delta, dp.accountant) for r in range(1, study.rounds + 1)]


def test_site_refuses_the_round_that_would_exceed_its_budget_and_sends_nothing(root: Path, tmp_path: Path) -> None:
    probe = _dp_wdbc(root, tmp_path / "probe", {})
    path = _epsilon_path(probe, "hospital_c")
    budget = round((path[0] + path[1]) / 2, 4)  # enough for round 1, not for round 2
    study = _dp_wdbc(root, tmp_path / "run", {"hospital_a": 10.0, "hospital_b": 10.0, "hospital_c": budget}, min_sites=2)

    report = simulate(study, tmp_path / "out", progress=False)

    assert report["status"] == "completed"
    rounds = report["rounds"]
    assert "hospital_c" in rounds[0]["fit"]["sites"]
    for entry in rounds[1:]:  # the server received no update from the refusing site
        assert "hospital_c" not in entry["fit"]["sites"]
        assert {"hospital_a", "hospital_b"} <= set(entry["fit"]["sites"])
    privacy = report["privacy"]["hospital_c"]
    assert len(privacy["refusals"]) == 2 and "E160" in privacy["refusals"][0]  # the coordinator sees the code
    assert "refused round 2" in (tmp_path / "out" / "audit" / "hospital_c.errors.log").read_text()  # the site, the line
    assert privacy["epsilon"] == pytest.approx(path[0], rel=1e-6) and privacy["epsilon"] <= budget
    for site in ("hospital_a", "hospital_b"):
        assert report["privacy"][site]["epsilon"] <= load_study(study).privacy.target_epsilon
    ledger = PrivacyLedger(tmp_path / "out" / "ledgers" / "hospital_c.ledger.sqlite", "hospital_c")
    assert [e.round for e in ledger.entries] == [1]  # spent once, refused twice
    page = (tmp_path / "out" / "report.html").read_text()
    assert "E160" in page and page.count("<svg") >= 4  # the epsilon plot is there


def test_ledger_composes_across_studies_and_stops_a_study_that_would_overspend(root: Path, tmp_path: Path) -> None:
    probe = _dp_wdbc(root, tmp_path / "probe", {}, rounds=2)
    study_cfg = load_study(probe)
    site = load_site(study_cfg.sites[0].config)
    from shared.contract import load_site_data

    dp = plan_dp_round(TrainingPlan.from_study(study_cfg), site, load_site_data(site, "binary").n_train)
    after = [epsilon([dp.step] * k, dp.delta, dp.accountant) for k in (3, 4)]
    budget = round(sum(after) / 2, 4)  # two rounds of study A + one of study B fit; a fourth round does not
    study = _dp_wdbc(root, tmp_path / "a", {"hospital_a": budget}, rounds=2)
    ledgers = tmp_path / "ledgers"
    first = simulate(study, tmp_path / "out-a", progress=False, ledger_dir=ledgers)
    spent_a = first["privacy"]["hospital_a"]["epsilon"]

    second_study = dataclasses.replace(load_study(study), name="wdbc-dp-second")
    with pytest.raises(FedhelixError, match=r"refused round 2 of study 'wdbc-dp-second'"):
        simulate(second_study, tmp_path / "out-b", progress=False, ledger_dir=ledgers)

    report = json.loads((tmp_path / "out-b" / "report.json").read_text())
    assert report["status"] == "failed" and len(report["rounds"]) == 1
    # round 1 of the second study composed on top of the first study's spending
    eps_b1 = report["privacy"]["hospital_a"]["epsilon"]
    assert eps_b1 > spent_a
    ledger = PrivacyLedger(ledgers / "hospital_a.ledger.sqlite", "hospital_a")
    assert [(e.study, e.round) for e in ledger.entries] == [("wdbc-dp", 1), ("wdbc-dp", 2), ("wdbc-dp-second", 1)]
    assert ledger.spent(ledger.entries[-1].delta) == pytest.approx(eps_b1, rel=1e-9) and eps_b1 <= budget
