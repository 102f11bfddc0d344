"""The protocol's tests: the administrator's policy as a fresh installation has it."""

from __future__ import annotations

import pytest

from cellblock import config as config_module
from cellblock.service.protocol import LimitPolicy


@pytest.fixture(scope="module")
def policy(tmp_path_factory: pytest.TempPathFactory) -> LimitPolicy:
    """The administrator's policy as a fresh installation has it (no file, no variables)."""
    return config_module.load(tmp_path_factory.mktemp("state"), environ={}).limits
