"""Shared fixtures: repository paths and a quiet, offline Flower environment."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from shared.flower_env import apply_flower_env

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True, scope="session")
def _flower_env(tmp_path_factory: pytest.TempPathFactory):
    apply_flower_env()
    os.environ.setdefault("FLWR_HOME", str(tmp_path_factory.mktemp("flwr_home")))
    yield


@pytest.fixture
def root() -> Path:
    return ROOT
