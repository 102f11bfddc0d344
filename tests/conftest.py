"""Fixtures shared by every test folder: a configuration and state directory of one's own."""

from __future__ import annotations

from pathlib import Path

import pytest

from cellblock import config as config_module


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    path = tmp_path / "state"
    path.mkdir()
    return path


@pytest.fixture
def config(state_dir: Path) -> config_module.Config:
    return config_module.load(state_dir, environ={})
