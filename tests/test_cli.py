"""The `fedhelix` program as a user meets it: exit codes and one-line errors, no tracebacks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest


def fedhelix(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedhelix.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=120)


def test_check_site_accepts_a_good_site(root: Path) -> None:
    result = fedhelix("check-site", str(root / "studies" / "tcga-brca" / "sites" / "canada.toml"), "--study", str(root / "studies" / "tcga-brca" / "study.toml"))
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout and "40 train / 11 test" in result.stdout


def test_check_site_names_the_problem_in_one_line_and_exits_2(root: Path, tmp_path: Path) -> None:
    frame = pd.read_csv(root / "data" / "wdbc" / "hospital_a.csv").drop(columns=["malignant"])
    frame.to_csv(tmp_path / "a.csv", index=False)
    (tmp_path / "a.toml").write_text('[site]\nname = "a"\n[data]\npath = "a.csv"\nlabel = "malignant"\n')
    result = fedhelix("check-site", str(tmp_path / "a.toml"))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    message = " ".join(lines)
    assert message.startswith("error:") and "site 'a'" in message and "'malignant'" in message


def test_ledger_show_before_any_spending(root: Path, tmp_path: Path) -> None:
    (tmp_path / "s.toml").write_text(
        '[site]\nname = "s"\n[data]\npath = "s.csv"\nlabel = "y"\n[privacy]\nledger = "s.sqlite"\nepsilon_budget = 3.0\ndelta = 1e-5\n'
    )
    result = fedhelix("ledger", "show", str(tmp_path / "s.toml"))
    assert result.returncode == 0, result.stderr
    assert "no ledger yet" in result.stdout and not (tmp_path / "s.sqlite").exists()


# ----------------------------------------------------------------------------- text as written


def test_a_contract_fix_naming_a_section_reaches_the_terminal_unchanged(tmp_path: Path) -> None:
    pd.DataFrame({"x": [1.0, 2.0, 3.0, 4.0], "ward": ["a", "b", "a", "b"], "y": [0, 1, 0, 1]}).to_csv(tmp_path / "a.csv", index=False)
    (tmp_path / "a.toml").write_text('[site]\nname = "a"\n[data]\npath = "a.csv"\nlabel = "y"\ncategorical = ["ward"]\n')
    (tmp_path / "s.toml").write_text('[study]\nname = "s"\ntask = "binary"\nmodel = "logistic"\n[[sites]]\nname = "a"\nconfig = "a.toml"\n')
    result = fedhelix("check-site", str(tmp_path / "a.toml"), "--study", str(tmp_path / "s.toml"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1  # one line however long, piped or not
    assert "the study file must list them under [data.categories] ward = [...]" in result.stderr


def test_a_warning_with_brackets_is_printed_as_written(tmp_path: Path) -> None:
    smiles = ["CCO", "CCN", "CCC", "CCCl", "c1ccccc1", "CC(=O)O", "c1cc[nH]"]  # the last one: an unclosed ring
    pd.DataFrame({"smiles": smiles, "y": [0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5]}).to_csv(tmp_path / "m.csv", index=False)
    (tmp_path / "m.toml").write_text('[site]\nname = "m"\n[data]\npath = "m.csv"\nformat = "smiles"\nsmiles = "smiles"\nlabel = "y"\ninvalid_smiles = "skip"\n')
    result = fedhelix("check-site", str(tmp_path / "m.toml"))
    assert result.returncode == 0, result.stderr
    assert "warning skipped 1 of 7 SMILES are invalid or empty: row 7 ('c1cc[nH]')" in result.stdout


def test_help_texts_naming_a_section_render_it(root: Path) -> None:
    ledger = fedhelix("ledger", "show", "--help")
    assert "[privacy] section" in " ".join(ledger.stdout.split())
    assert "[data.categories]" in fedhelix("check-site", "--help").stdout


def test_no_help_text_loses_text_to_rich_markup() -> None:
    """Typer reads help as rich markup: a help text may only hold escaped brackets."""
    import typer.main
    from rich.text import Text

    from fedhelix.cli import app

    def texts(command):
        yield command.help or ""
        for param in command.params:
            yield getattr(param, "help", None) or ""
        for sub in getattr(command, "commands", {}).values():
            yield from texts(sub)

    all_help = [h for h in texts(typer.main.get_command(app)) if h]
    assert len(all_help) > 30
    for text in all_help:
        assert Text.from_markup(text).plain == text.replace("\\[", "["), text


# ----------------------------------------------------------------------------- check-site without a study


def small_copy(root: Path, site: str, out: Path, rows: int = 80) -> Path:
    """A bundled site file with an evenly spaced sample of its table (train and test rows), to keep the test quick."""
    source = root / site
    frame = pd.read_csv(source.with_suffix(".csv"))
    sample = frame.iloc[:: max(1, len(frame) // rows)]
    assert set(sample["split"]) == {"train", "test"}
    out.mkdir(parents=True, exist_ok=True)
    sample.to_csv(out / source.with_suffix(".csv").name, index=False)
    (out / source.name).write_text(source.read_text())
    return out / source.name


def test_check_site_without_a_study_checks_only_what_every_task_shares(root: Path, tmp_path: Path) -> None:
    """Regression (ESOL), 12-label multitask (Tox21) and survival (TCGA) sites all pass without a study."""
    from typer.testing import CliRunner

    from fedhelix.cli import app

    sites = [small_copy(root, "studies/esol/company_1.toml", tmp_path / "esol"), small_copy(root, "studies/tox21/company_2.toml", tmp_path / "tox21")]
    for site in [*sites, root / "studies" / "tcga-brca" / "sites" / "west.toml"]:
        result = CliRunner().invoke(app, ["check-site", str(site)])
        assert result.exit_code == 0, (site, result.exception)
        assert result.stdout.startswith("OK site") and "(task-independent checks only; give --study to check labels against a study's task)" in result.stdout, result.stdout


def test_check_site_with_a_study_still_checks_the_labels(root: Path, tmp_path: Path) -> None:
    """The same regression site against a binary study: its labels are not 0/1."""
    site = small_copy(root, "studies/esol/company_1.toml", tmp_path / "esol")
    result = fedhelix("check-site", str(site), "--study", str(root / "studies" / "tox21" / "study.toml"))
    assert result.returncode == 2
    assert "label must be 0/1" in result.stderr and "Traceback" not in result.stderr


# ----------------------------------------------------------------------------- the server's ports


def test_fedhelix_server_on_a_taken_port_names_the_port_and_the_kit_field(tmp_path: Path) -> None:
    import socket

    from server.deployment import start_server
    from server.provision import ConsortiumConfig, provision
    from shared.errors import ConfigError

    with socket.socket() as gateway_port, socket.socket() as link_port:
        for sock in (gateway_port, link_port):
            sock.bind(("127.0.0.1", 0))
        gateway, link = gateway_port.getsockname()[1], link_port.getsockname()[1]
        provision(ConsortiumConfig(name="c", server_address=f"127.0.0.1:{gateway}", sites=("a",), link_port=link), tmp_path / "kits")
        link_port.listen()  # another server's SuperLink
        result = fedhelix("server", "--kit", str(tmp_path / "kits" / "server"))
        assert result.returncode == 2, result.stdout + result.stderr
        assert result.stderr.strip() == (
            f"error: port {link} on this host is in use (another fedhelix server?); stop it, or set another link_port in {tmp_path / 'kits' / 'server' / 'server.toml'}"
        )
        link_port.close()
        gateway_port.listen()  # another program on the sites' port
        with pytest.raises(ConfigError, match=rf"port {gateway} on this host is in use .*set another port in listen of .*server.toml"):
            start_server(tmp_path / "kits" / "server")
    assert not (tmp_path / "kits" / "server" / "state" / "superlink.log").exists()  # nothing was started
