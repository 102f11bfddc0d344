"""The embedded deployment for real: a Jupyter server whose extension starts a local
``cellblock up`` (Redis, the service, an executor) with it, hands the kernels its URL and
token, and stops it, and everything it started, with the server. Plus where the extension's
configuration comes from, and the wheel that enables it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest
from jupyterio import ADMIN, ALICE, Fetch
from kernelrun import printed_by
from procio import processes_of
from tornado.httpclient import HTTPResponse

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def embedded_state(tmp_path: Path) -> Path:
    return tmp_path / "cellblock-state"


@pytest.fixture
def up_environ(monkeypatch: pytest.MonkeyPatch, sandbox_root: Path) -> None:
    """What ``cellblock up`` inherits from the server: this session's sandbox root (0711),
    short leases."""
    monkeypatch.setenv("CELLBLOCK_SANDBOX__ROOT", f'"{sandbox_root}"')
    monkeypatch.setenv("CELLBLOCK_LEASE_TIMEOUT", "1.5")


@pytest.fixture
def cellblock_config(
    request: pytest.FixtureRequest, embedded_state: Path, up_environ: None
) -> dict[str, Any]:
    """``c.Cellblock`` of an embedded deployment: one executor, no builder, state in tmp
    (this file's own: no in-process service here). A parameter's None leaves a setting to its
    default."""
    config: dict[str, Any] = {
        "start_local": True,
        "state_dir": str(embedded_state),
        "executors": 1,
        "builders": 0,
    }
    config.update(getattr(request, "param", {}))
    return {key: value for key, value in config.items() if value is not None}


def extension(serverapp: Any) -> Any:
    """The server's Cellblock extension app."""
    [app] = serverapp.extension_manager.extension_apps["cellblock.server_ext"]
    return app


async def ready_status(fetch: Fetch, executors: int = 1) -> dict[str, Any] | None:
    """status.json once the deployment is up with ``executors`` executors (503 until then)."""
    response = await fetch("status.json")
    if response.code == 503:
        return None
    assert response.code == 200, response.body
    status: dict[str, Any] = json.loads(response.body)
    return status if status["health"]["executors"] == executors else None


def assert_secret_not_in(secret: str, *responses: HTTPResponse) -> None:
    for response in responses:
        assert secret.encode() not in response.body
        assert all(secret not in v for _, v in response.headers.get_all())


async def kernel_environ(serverapp: Any, *names: str) -> dict[str, str]:
    """The values of ``names`` in the environment of a kernel the server starts now."""
    manager = serverapp.kernel_manager
    kernel_id = await manager.start_kernel(kernel_name="python3")
    client = manager.get_kernel(kernel_id).client()
    client.start_channels()
    try:
        code = f"import json, os; print(json.dumps({{n: os.environ.get(n) for n in {names!r}}}))"
        values: dict[str, str] = json.loads(await printed_by(client, code))
        return values
    finally:
        client.stop_channels()
        await manager.shutdown_kernel(kernel_id, now=True)


@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_the_embedded_deployment_starts_serves_and_stops_with_the_server(
    jp_serverapp: Any, fetch: Fetch, embedded_state: Path, until: Any
) -> None:
    app = extension(jp_serverapp)
    assert app.deployment is not None
    # Until `cellblock up` answers with an executor, the API answers 503; then it works.
    status = await until(lambda: ready_status(fetch), "the embedded executor", timeout=120)
    token = (embedded_state / "token").read_text().strip()
    admin = (embedded_state / "admin-token").read_text().strip()
    url = (embedded_state / "url").read_text().strip()
    assert status["service"] == url == app.deployment.url
    assert status["health"]["status"] == "ok"
    assert [w["kind"] for w in status["workers"]] == ["executor"]  # the admin token was read

    created = await fetch(
        "api", "v1", "submissions", method="POST", params={"wait": "true", "timeout": "60"},
        body={"run": 'echo "embedded $1"', "args": ["ok"]}, request_timeout=90,
    )  # fmt: skip
    assert created.code == 201
    state = json.loads(created.body)
    assert state["status"] == "finished" and state["stages"]["run"]["stdout"] == "embedded ok\n"
    listed = await fetch("status.json")
    assert [s["id"] for s in json.loads(listed.body)["submissions"]] == [state["id"]]
    for secret in (token, admin):
        assert_secret_not_in(secret, created, listed)

    # The kernels the server starts get the deployment's URL and client token, and a state
    # directory that holds those and nothing else: never the admin token.
    assert os.environ["CELLBLOCK_URL"] == url
    assert os.environ["CELLBLOCK_TOKEN"] == token
    kernels = app.deployment.kernel_dir
    names = ("CELLBLOCK_URL", "CELLBLOCK_TOKEN", "CELLBLOCK_ADMIN_TOKEN", "CELLBLOCK_STATE_DIR")
    seen = await kernel_environ(jp_serverapp, *names)
    assert seen == dict(zip(names, (url, token, None, str(kernels)), strict=True))
    assert admin not in json.dumps(seen)
    assert {p.name: p.read_text() for p in kernels.iterdir()} == {
        "url": f"{url}\n",
        "token": f"{token}\n",
    }
    assert all(p.stat().st_mode & 0o077 == 0 for p in (kernels, *kernels.iterdir()))

    # Stopping the server stops the extension (what ServerApp's own cleanup calls): nothing
    # that `cellblock up` started is left.
    running = processes_of(embedded_state)
    assert app.deployment.proc.pid in running and len(running) >= 4  # up, redis, service, executor
    await jp_serverapp.cleanup_extensions()
    assert app.deployment.proc.poll() is not None
    assert processes_of(embedded_state) == {}


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_a_server_stopped_while_the_deployment_starts_leaves_nothing_behind(
    jp_serverapp: Any, embedded_state: Path, until: Any
) -> None:
    app = extension(jp_serverapp)
    # Stop as soon as `cellblock up` has started children of its own (Redis first).
    await until(lambda: len(processes_of(embedded_state)) >= 2, "`cellblock up` to start Redis")
    await jp_serverapp.cleanup_extensions()
    assert app.deployment.proc.poll() is not None
    await until(lambda: processes_of(embedded_state) == {}, "nothing left running", timeout=10)


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("cellblock_config", [{"executors": 0}], ids=["no-executor"], indirect=True)
async def test_a_deployment_of_no_executors_comes_up_all_the_same(
    jp_serverapp: Any, fetch: Fetch, embedded_state: Path, until: Any
) -> None:
    # Executors may join later (POST /api/v1/admin/scale): nothing to wait for at start.
    status = await until(lambda: ready_status(fetch, executors=0), "the service", timeout=60)
    assert status["workers"] == []
    await jp_serverapp.cleanup_extensions()
    assert processes_of(embedded_state) == {}


# --- where the configuration comes from ----------------------------------------------------


@pytest.mark.parametrize(
    "cellblock_config", [{"start_local": None, "state_dir": None}], ids=["defaults"], indirect=True
)
async def test_without_cellblock_url_a_local_deployment_is_the_default(
    jp_serverapp: Any, jp_home_dir: Path, cellblock_config: dict[str, Any]
) -> None:
    app = extension(jp_serverapp)
    assert app.start_local is True
    default_state = jp_home_dir / ".local" / "state" / "cellblock-jupyter"
    assert app.deployment.state_dir == default_state
    await jp_serverapp.cleanup_extensions()
    assert processes_of(default_state) == {}


@pytest.fixture
def from_environment(monkeypatch: pytest.MonkeyPatch, service: Any) -> Any:
    monkeypatch.setenv("CELLBLOCK_URL", service.url)
    monkeypatch.setenv("CELLBLOCK_TOKEN", ALICE)
    return service


@pytest.mark.parametrize(
    "cellblock_config", [{"start_local": None, "state_dir": None}], ids=["defaults"], indirect=True
)
async def test_with_cellblock_url_set_the_extension_uses_that_service(
    from_environment: Any, jp_serverapp: Any, fetch: Fetch
) -> None:
    app = extension(jp_serverapp)
    assert app.start_local is False and app.deployment is None
    health = await fetch("api", "v1", "health")
    assert health.code == 200 and json.loads(health.body)["status"] == "ok"
    status = json.loads((await fetch("status.json")).body)
    assert status["service"] == from_environment.url
    assert status["workers"] is None  # no admin token given


@pytest.fixture
def admin_from_environment(monkeypatch: pytest.MonkeyPatch, from_environment: Any) -> None:
    """An admin token set before the server starts, as ``CELLBLOCK_ADMIN_TOKEN=... jupyter
    lab`` sets it (asked for before jp_serverapp)."""
    monkeypatch.setenv("CELLBLOCK_ADMIN_TOKEN", ADMIN)


@pytest.mark.parametrize(
    "cellblock_config", [{"start_local": None, "state_dir": None}], ids=["defaults"], indirect=True
)
async def test_an_admin_token_in_the_servers_environment_stays_with_the_extension(
    admin_from_environment: None, jp_serverapp: Any, fetch: Fetch
) -> None:
    assert "CELLBLOCK_ADMIN_TOKEN" not in os.environ
    assert extension(jp_serverapp).settings["cellblock_backend"].admin_token == ADMIN
    status = json.loads((await fetch("status.json")).body)
    assert status["workers"] is not None  # the status page still makes its admin calls
    names = ("CELLBLOCK_TOKEN", "CELLBLOCK_ADMIN_TOKEN")
    seen = await kernel_environ(jp_serverapp, *names)
    assert seen == dict(zip(names, (ALICE, None), strict=True))


# --- the wheel -----------------------------------------------------------------------------


@pytest.mark.slow
def test_the_wheel_enables_the_extension_and_installs_the_kernelspec(tmp_path: Path) -> None:
    # Built from a copy, so that the build's own files (build/, *.egg-info) stay out of the
    # working tree. The frontend's node_modules are build tools, not part of any wheel.
    source = tmp_path / "source"
    source.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, source / name)
    for part in ("cellblock", "service", "executor", "cachebuilder", "kernel", "server_ext"):
        ignore = shutil.ignore_patterns("node_modules", "__pycache__")
        shutil.copytree(REPO / part, source / part, ignore=ignore, symlinks=True)
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), "."],
        cwd=source, capture_output=True, text=True, timeout=50,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr
    [wheel] = tmp_path.glob("cellblock-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        [config] = [
            n for n in names if n.endswith("/etc/jupyter/jupyter_server_config.d/cellblock.json")
        ]
        [kernelspec] = [
            n for n in names if n.endswith("/share/jupyter/kernels/cellblock/kernel.json")
        ]
        enabled = json.loads(archive.read(config))
        spec = json.loads(archive.read(kernelspec))
    # Shared data, which pip installs under the environment's prefix.
    data = f"{wheel.name.split('-')[0]}-{wheel.name.split('-')[1]}.data/data/"
    assert config == f"{data}etc/jupyter/jupyter_server_config.d/cellblock.json"
    assert kernelspec == f"{data}share/jupyter/kernels/cellblock/kernel.json"
    assert enabled == {"ServerApp": {"jpserver_extensions": {"cellblock.server_ext": True}}}
    assert spec["argv"][1:3] == ["-m", "cellblock.kernel"] and spec["display_name"] == "Cellblock"
    # And the package itself, with the status page's template.
    assert "cellblock/server_ext/templates/status.html" in names
