"""Kernel tests: the real ``cellblock`` kernelspec, real kernel processes (jupyter_client), the
real service, executors and cache builders of tests/conftest.py."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from typing import Any

import pytest
from jupyter_client.manager import start_new_async_kernel
from kernelio import Kernel, StartKernel, kernel_env

from cellblock.kernel.install import install


@pytest.fixture(scope="session")
def kernelspec() -> str:
    """The ``cellblock`` kernelspec in this venv (``pip install -e`` does not install it)."""
    return install(prefix=sys.prefix)


@pytest.fixture
async def start_kernel(kernelspec: str) -> AsyncIterator[StartKernel]:
    """Start real ``cellblock`` kernels with the given environment; shut down at the end."""
    started: list[Kernel] = []

    async def start(env: dict[str, str]) -> Kernel:
        km, kc = await start_new_async_kernel(kernel_name="cellblock", env=env)
        started.append((km, kc))
        return km, kc

    yield start
    for km, kc in started:
        kc.stop_channels()
        await km.shutdown_kernel(now=False)


@pytest.fixture
async def kernel(service: Any, executor: Any, start_kernel: StartKernel) -> Kernel:
    """A kernel talking to the in-process service, with one executor behind it."""
    return await start_kernel(kernel_env(service.url))
