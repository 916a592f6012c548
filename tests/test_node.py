"""``fedhelix node``'s supervision of the SuperNode: refused activations are retried, then named."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

import client.node as node
from client.node import NodeKit, NodePlan, run_node
from shared.errors import FedhelixError

# Stands in for flower-supernode: counts its starts in a file; refused (Flower's exit 305) the first `refusals` times.
FAKE_SUPERNODE = """
import pathlib, sys
counter, refusals = pathlib.Path(sys.argv[1]), int(sys.argv[2])
starts = int(counter.read_text()) + 1 if counter.exists() else 1
counter.write_text(str(starts))
if starts <= refusals:
    print("ERROR: Exit Code: 305\\nFailed to activate SuperNode.", flush=True)
    sys.exit(1)
print("SuperNode ID: 42", flush=True)
"""


def plan(tmp_path: Path, refusals: int, wait_s: float) -> NodePlan:
    kit = NodeKit(tmp_path / "kit", "c", "west", "127.0.0.1:1")
    command = [sys.executable, "-c", FAKE_SUPERNODE, str(tmp_path / "starts"), str(refusals)]
    return NodePlan(kit, None, tmp_path / "approvals.json", None, command, None, wait_s)  # type: ignore[arg-type]


def starts(tmp_path: Path) -> int:
    return int((tmp_path / "starts").read_text())


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch) -> None:
    monkeypatch.setattr(node, "REJOIN_RETRY_S", 0.05)


def test_a_node_restarted_after_a_crash_is_retried_until_the_server_activates_it(tmp_path: Path, capfd) -> None:
    assert run_node(plan(tmp_path, refusals=2, wait_s=30)) == 0
    assert starts(tmp_path) == 3
    assert capfd.readouterr().out.count("retrying for another") == 2


def test_a_key_that_stays_refused_ends_with_the_allow_list_line(tmp_path: Path, capfd) -> None:
    with pytest.raises(FedhelixError, match=r"site 'west' is not on the consortium's allow-list; ask the consortium admin to register .*node.pub"):
        run_node(plan(tmp_path, refusals=10**6, wait_s=0.5))
    assert starts(tmp_path) >= 2
    assert "retrying for another" in capfd.readouterr().out


def test_no_rejoin_wait_gives_up_at_once(tmp_path: Path) -> None:
    with pytest.raises(FedhelixError, match="allow-list"):
        run_node(plan(tmp_path, refusals=1, wait_s=0))
    assert starts(tmp_path) == 1


# --------------------------------------------------------------------------- the node's data check at start


@pytest.fixture(scope="module")
def kits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from server.provision import ConsortiumConfig, provision

    root = tmp_path_factory.mktemp("kits")
    provision(ConsortiumConfig(name="c", server_address="127.0.0.1:9", sites=("company_1",)), root / "kits")
    return root / "kits"


def company_site(tmp_path: Path, study: str) -> tuple[Path, Path]:
    """company_1 of a bundled molecule study, copied (its approvals file is written beside the site file)."""
    import shutil

    from shared.paths import PROJECT_ROOT

    source = PROJECT_ROOT / "studies" / study
    target = tmp_path / study
    target.mkdir()
    for name in ("study.toml", "company_1.toml", "company_1.csv"):
        shutil.copy(source / name, target / name)
    return target / "study.toml", target / "company_1.toml"


@pytest.mark.parametrize("study", ["esol", "tox21"])
def test_a_node_checks_its_data_against_the_task_of_the_study_it_approved(kits: Path, tmp_path: Path, study: str) -> None:
    from client.approval import approve, read_approvals
    from client.node import prepare_node
    from shared.config import load_site

    study_file, site_file = company_site(tmp_path, study)
    approve(study_file, load_site(site_file), "digest")
    (record,) = read_approvals(tmp_path / study / "company_1.approvals.json")
    assert (record.task, record.model) == ({"esol": "regression", "tox21": "multitask"}[study], "gnn")
    plan = prepare_node(kits / "company_1", site_file, probe=False, fast=False)  # regression / 12 labels: not binary
    assert plan.site.name == "company_1"


def test_a_node_whose_data_does_not_fit_its_approved_study_refuses_to_start_in_one_line(kits: Path, tmp_path: Path) -> None:
    from client.approval import approve
    from client.node import prepare_node
    from shared.config import load_site
    from shared.errors import DataContractError

    study_file, site_file = company_site(tmp_path, "esol")
    approve(study_file, load_site(site_file), "digest")
    binary = tmp_path / "esol" / "binary.toml"  # the site's IT approves a binary study of the same (solubility) table
    binary.write_text(study_file.read_text().replace('task = "regression"', 'task = "binary"').replace('name = "esol"', 'name = "esol-binary"'))
    approve(binary, load_site(site_file), "digest")
    with pytest.raises(DataContractError) as err:
        prepare_node(kits / "company_1", site_file, probe=False, fast=False)
    line = err.value.line
    assert "approved study 'esol-binary' (binary, model gnn)" in line and "label must be 0/1" in line and "\n" not in str(err.value)


# ----------------------------------------------------------------------------- the node's own port


@pytest.fixture
def listener():
    """A real socket listening on a loopback port, as a first node on this host would."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def site_kit(tmp_path: Path, root: Path) -> tuple[Path, Path]:
    """A provisioned kit for the TCGA-BRCA site 'canada' and its site file (data in the repository)."""
    from server.provision import ConsortiumConfig, provision

    provision(ConsortiumConfig(name="c", server_address="127.0.0.1:1", sites=("canada",)), tmp_path / "kits")
    site = tmp_path / "canada.toml"
    data = root / "data" / "tcga_brca" / "regions" / "canada.csv"
    site.write_text(f'[site]\nname = "canada"\n[data]\npath = "{data}"\nlabel = "E"\ntime = "T"\ndrop = ["pid"]\nsplit_column = "fold"\n')
    return tmp_path / "kits" / "canada", site


def test_a_second_node_on_the_same_port_is_one_line_naming_the_port(tmp_path: Path, root: Path, listener: int) -> None:
    from shared.errors import ConfigError

    kit, site = site_kit(tmp_path, root)
    with pytest.raises(ConfigError, match=rf"port {listener} on this host is in use \(another node\?\); give this node its own --port$"):
        node.prepare_node(kit, site, port=listener, probe=False)
    free = node.prepare_node(kit, site, port=listener + 1 if listener < 65535 else listener - 1, probe=False)  # only the port was wrong
    assert "--port" in free.command


def test_fedhelix_node_on_a_taken_port_exits_2_with_one_line(tmp_path: Path, root: Path, listener: int) -> None:
    import subprocess

    kit, site = site_kit(tmp_path, root)
    done = subprocess.run(
        [sys.executable, "-m", "fedhelix.cli", "node", "--kit", str(kit), "--site", str(site), "--port", str(listener)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.strip() == f"error: port {listener} on this host is in use (another node?); give this node its own --port"


def test_each_node_installs_apps_in_its_own_flwr_home(tmp_path: Path, root: Path) -> None:
    """Two nodes on one host must not unpack runs' apps into one shared FLWR_HOME (a race, and one could plant code for the other)."""
    import stat

    from server.provision import add_site

    kit, site = site_kit(tmp_path, root)
    other_kit = add_site(tmp_path / "kits", "denmark")
    other_site = tmp_path / "denmark.toml"
    other_site.write_text(site.read_text().replace('name = "canada"', 'name = "denmark"'))
    first = node.prepare_node(kit, site, port=19094, probe=False)
    second = node.prepare_node(other_kit, other_site, port=19095, probe=False)
    assert first.flwr_home is not None and second.flwr_home is not None and first.flwr_home != second.flwr_home
    assert stat.S_IMODE(first.flwr_home.stat().st_mode) == 0o700
