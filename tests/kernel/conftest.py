"""Kernel tests: the real ``cellblock`` kernelspec, real kernel processes (jupyter_client), the
real service, executors and cache builders of tests/conftest.py."""

from __future__ import annotations

import sys
import time
import warnings
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from jupyter_client.manager import start_new_async_kernel
from kernelio import Kernel, StartKernel, accepts, kernel_env

from cellblock.kernel.install import install


@pytest.fixture(scope="session")
def kernelspec() -> str:
    """The ``cellblock`` kernelspec in this venv (``pip install -e`` does not install it)."""
    return install(prefix=sys.prefix)


@pytest.fixture
def redis_url(redis_url: str) -> str:
    """tests/conftest.py's redis-server, once it accepts connections. That fixture waits for
    the socket file only, which redis-server creates (bind) a moment before it listens: a
    connection in between is refused, and under load that moment is long enough to hit."""
    deadline = time.monotonic() + 10
    while not accepts(redis_url.removeprefix("unix://")):
        if time.monotonic() > deadline:
            pytest.fail(f"nothing listens on {redis_url}")
        time.sleep(0.01)
    return redis_url


@pytest.fixture
def executor(start_executor: Callable[..., Any]) -> Any:
    # start_executor hands Popen a log file it never closes (tests/conftest.py); that is not
    # what these tests test.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "unclosed file", ResourceWarning)
        return start_executor()


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
