"""Bundled studies run deployed and give what their simulation gives.

One consortium on loopback (``fedhelix server``, a ``fedhelix node`` per site file, each
study approved at each of its sites, ``fedhelix run``) runs study files under ``studies/``,
shortened to one round of a few local steps; the same file is simulated.
The final model and per-site metrics must agree: within the SecAgg+ quantisation bound
(every bundled study masks its updates), metrics to 1e-2. DP studies run as their non-DP
twin: a real node draws its DP noise from the OS, so no two runs of them agree.
The comparison itself is :mod:`bench.deployed_studies`, which runs all of them and records
the count. Here, to keep the suite within its time, the two deployed paths no other e2e test
takes: omics with federated feature selection and standardisation, and molecule graphs
(tables are ``test_deployment``'s TCGA, ``test_multi_host``'s and ``test_fast_rounds``');
every study is ``FEDHELIX_ALL_STUDIES=1`` (about 6x longer), and ``bench/deployed_studies.py``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.deployed_studies import Case, Consortium, compare, consortium, run_order, simulated, site_name, stage  # noqa: E402

pytestmark = pytest.mark.e2e

DISTINCT = ("gse7390/study.toml", "esol/study.toml")
STUDIES = [s for s in run_order() if os.environ.get("FEDHELIX_ALL_STUDIES") == "1" or s in DISTINCT]


@pytest.fixture(scope="module")
def staged(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Case]]:
    root = tmp_path_factory.mktemp("bundled")
    return root, {c.id: c for c in stage(root) if c.id in STUDIES}


@pytest.fixture(scope="module")
def bundled(staged: tuple[Path, dict[str, Case]]) -> Iterator[Consortium]:
    root, cases = staged
    with consortium(root, list(cases.values())) as c:
        yield c


@pytest.mark.parametrize("case_id", STUDIES)  # studies over the same site files in a row: their nodes stay up
def test_bundled_study_deployed_equals_simulated(case_id: str, staged: tuple[Path, dict[str, Case]], bundled: Consortium) -> None:
    root, cases = staged
    case = cases[case_id]
    deployed = bundled.run(case)
    simulation = simulated(case, root / "sim" / case_id.replace("/", "-"))
    assert compare(case, deployed, simulation) == []
    assert sorted(deployed.report["final"]["sites"]) == sorted(site_name(site) for site in case.sites)
