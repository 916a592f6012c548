"""The `fedhelix` program as a user meets it: exit codes and one-line errors, no tracebacks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd


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
