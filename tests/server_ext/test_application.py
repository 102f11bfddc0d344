"""The extension's application (server_ext/application.py) in a real Jupyter server, in front of
the real in-process service of tests/conftest.py.

What it promises: the server finds it by its module and serves its four routes under the
server's base URL, and nothing else; ``c.Cellblock.url``/``token`` (else ``CELLBLOCK_URL``/
``CELLBLOCK_TOKEN``) choose the service, a trailing slash dropped, and both are put into the
environment the kernels inherit, while the admin token is taken out of it; half a
configuration is no service (a warning, and 503s); an embedded deployment that cannot start
is logged and leaves the server serving; a setting of the wrong type is refused. The embedded
deployment that does start is tests/server_ext/test_deployment.py's.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from jupyterio import ADMIN, ALICE, BOB, Fetch, closed_port
from tornado.httpclient import HTTPResponse

import cellblock.server_ext
from cellblock.server_ext.application import Cellblock

REPO = Path(__file__).resolve().parents[2]
API = ("api", "v1")
ConfigOf = Callable[[Any], dict[str, Any]]  # c.Cellblock of a test, from the service
PROPAGATE = {"propagate": True}


@pytest.fixture(autouse=True)
def no_setting_left_behind() -> Iterator[None]:
    """The extension writes CELLBLOCK_URL, CELLBLOCK_TOKEN and CELLBLOCK_STATE_DIR into the
    environment. conftest.py's cellblock_environ does not take them out again: monkeypatch
    restores a variable it deleted, and there was none to delete. Here, they go."""
    before = {k: v for k, v in os.environ.items() if k.startswith("CELLBLOCK_")}
    yield
    for name in [k for k in os.environ if k.startswith("CELLBLOCK_")]:
        del os.environ[name]
    os.environ.update(before)


@pytest.fixture
def cellblock_config(request: pytest.FixtureRequest, service: Any) -> dict[str, Any]:
    """``c.Cellblock``: by default the in-process service as alice, with the admin token; a
    test's indirect parameter is a function of the service answering the whole setting."""
    config_of: ConfigOf = getattr(request, "param", None) or (
        lambda svc: {"start_local": False, "url": svc.url, "token": ALICE, "admin_token": ADMIN}
    )
    # The extension's logger (traitlets', named after its class) does not propagate: made to
    # here, so that caplog sees what it logs.
    return {**config_of(service), "logging_config": {"loggers": {"Cellblock": PROPAGATE}}}


@pytest.fixture
def jp_server_config_extra() -> dict[str, Any]:
    """An extension that fails to load fails the test: the server would only log it."""
    return {"ServerApp": {"reraise_server_extension_failures": True}}


def said(caplog: pytest.LogCaptureFixture, text: str) -> list[logging.LogRecord]:
    """The records logged so far, the server's start (in the test's setup) included."""
    records = caplog.get_records("setup") + caplog.get_records("call")
    return [r for r in records if text in r.getMessage()]


def extension(serverapp: Any) -> Cellblock:
    [app] = serverapp.extension_manager.extension_apps["cellblock.server_ext"]
    assert isinstance(app, Cellblock)
    return app


def backend_of(serverapp: Any) -> Any:
    """The backend the handlers use: the web application's live setting."""
    return serverapp.web_app.settings["cellblock_backend"]


async def anonymous(http_server_client: Any, path: str) -> HTTPResponse:
    response: HTTPResponse = await http_server_client.fetch(
        path, raise_error=False, follow_redirects=False
    )
    return response


# --- found, and where it serves ------------------------------------------------------------


def test_the_server_finds_the_extension_by_its_module() -> None:
    # What `pip install` enables (the wheel's etc/jupyter config, a copy of this file)...
    enabling = json.loads((REPO / "server_ext/jupyter-config/cellblock.json").read_text())
    assert enabling == {"ServerApp": {"jpserver_extensions": {"cellblock.server_ext": True}}}
    # ...names the module whose extension points are this application.
    [point] = cellblock.server_ext._jupyter_server_extension_points()
    assert point == {"module": "cellblock.server_ext", "app": Cellblock}
    assert (Cellblock.name, Cellblock.extension_url) == ("cellblock", "/cellblock/")


async def test_its_routes_answer_under_the_base_url_and_nowhere_else(
    jp_serverapp: Any, jp_fetch: Any, fetch: Fetch, http_server_client: Any, jp_base_url: str
) -> None:
    assert jp_base_url != "/"  # pytest-jupyter's own, /a%40b/: the routes must follow it
    app = extension(jp_serverapp)
    assert app.serverapp is jp_serverapp
    page = await fetch("")
    assert page.code == 200 and page.headers["Content-Type"].startswith("text/html")
    bare = await jp_fetch("cellblock", raise_error=False, follow_redirects=False)
    assert bare.code == 200 and bare.body == page.body  # the trailing slash is optional
    assert (await fetch("status.json")).code == 200
    health = await fetch(*API, "health")
    assert health.code == 200 and json.loads(health.body)["status"] == "ok"  # the proxy
    # Nothing outside the API is forwarded, and nothing answers outside the base URL.
    assert (await fetch("api", "v2", "health")).code == 404
    assert (await fetch("api", "health")).code == 404
    for path in ("/cellblock/", "/cellblock/status.json", "/cellblock/api/v1/health"):
        assert (await anonymous(http_server_client, path)).code == 404, path


# --- which service ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cellblock_config",
    [lambda svc: {"start_local": False, "url": svc.url + "/", "token": ALICE}],
    ids=["trailing-slash"],
    indirect=True,
)
async def test_a_trailing_slash_on_the_url_is_dropped(
    jp_serverapp: Any, fetch: Fetch, service: Any
) -> None:
    assert backend_of(jp_serverapp).url == service.url
    assert os.environ["CELLBLOCK_URL"] == service.url  # what the kernels get
    assert (await fetch(*API, "health")).code == 200


@pytest.fixture
def stale_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The server started with another service and token in its environment."""
    monkeypatch.setenv("CELLBLOCK_URL", f"http://127.0.0.1:{closed_port()}")
    monkeypatch.setenv("CELLBLOCK_TOKEN", BOB)


@pytest.mark.parametrize(
    "cellblock_config",
    [lambda svc: {"start_local": False, "url": svc.url, "token": ALICE}],
    ids=["configured"],
    indirect=True,
)
async def test_the_configuration_wins_over_the_environment_and_replaces_it(
    stale_environment: None, jp_serverapp: Any, fetch: Fetch, service: Any
) -> None:
    backend = backend_of(jp_serverapp)
    assert (backend.url, backend.token) == (service.url, ALICE)
    # Kernels started from now on inherit the service the extension uses, not the stale one.
    assert (os.environ["CELLBLOCK_URL"], os.environ["CELLBLOCK_TOKEN"]) == (service.url, ALICE)
    created = await fetch(*API, "submissions", method="POST", body={"run": "true"})
    assert created.code == 201  # reached the service, as alice
    listed = json.loads((await fetch(*API, "submissions")).body)["submissions"]
    assert [s["id"] for s in listed] == [json.loads(created.body)["id"]]


@pytest.fixture
def token_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CELLBLOCK_TOKEN", ALICE)


@pytest.mark.parametrize(
    "cellblock_config", [lambda svc: {"start_local": False, "url": svc.url}], indirect=True
)
async def test_the_url_and_the_token_may_come_from_different_places(
    token_from_environment: None, jp_serverapp: Any, fetch: Fetch, service: Any
) -> None:
    backend = backend_of(jp_serverapp)
    assert (backend.url, backend.token, backend.admin_token) == (service.url, ALICE, None)
    assert (await fetch(*API, "health")).code == 200


@pytest.mark.parametrize(
    "cellblock_config",
    [
        lambda svc: {"start_local": False, "url": svc.url},
        lambda svc: {"start_local": False, "token": ALICE},
        lambda svc: {"start_local": False, "url": "", "token": ""},
    ],
    ids=["url-only", "token-only", "neither"],
    indirect=True,
)
async def test_half_a_configuration_is_no_service(
    caplog: pytest.LogCaptureFixture, jp_serverapp: Any, fetch: Fetch
) -> None:
    assert backend_of(jp_serverapp) is None
    [warning] = said(caplog, "Cellblock: no service configured (c.Cellblock.url / token)")
    assert warning.levelno == logging.WARNING
    assert "CELLBLOCK_URL" not in os.environ and "CELLBLOCK_TOKEN" not in os.environ
    for parts in ((*API, "health"), ("status.json",)):
        answer = await fetch(*parts)
        assert answer.code == 503, parts
    assert (await fetch("")).code == 200  # the page itself still renders, and says so


@pytest.fixture
def admin_in_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CELLBLOCK_ADMIN_TOKEN", "the-environments-admin-token")


async def test_the_admin_token_setting_wins_and_the_variable_leaves_the_environment(
    admin_in_environment: None, jp_serverapp: Any, fetch: Fetch
) -> None:
    assert backend_of(jp_serverapp).admin_token == ADMIN  # c.Cellblock.admin_token
    assert "CELLBLOCK_ADMIN_TOKEN" not in os.environ  # no kernel inherits any admin token
    status = json.loads((await fetch("status.json")).body)
    assert status["workers"] == []  # the admin call went through, with the setting's token


# --- the embedded deployment, when it cannot start ------------------------------------------


@pytest.fixture
def blocked(jp_home_dir: Path) -> Path:
    """A regular file where the state directory should be: no deployment can start there.
    In the home directory, so that ``~/blocked`` names it too."""
    path = jp_home_dir / "blocked"
    path.write_text("not a directory\n")
    return path


@pytest.fixture
def state_dir_from_environment(
    monkeypatch: pytest.MonkeyPatch, blocked: Path, cellblock_config: dict[str, Any]
) -> None:
    """``~/blocked`` as the state directory: from the environment unless configured."""
    if "state_dir" not in cellblock_config:
        monkeypatch.setenv("CELLBLOCK_STATE_DIR", "~/blocked")


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "cellblock_config",
    [
        lambda svc: {"start_local": True, "executors": 3, "builders": 0},
        lambda svc: {"start_local": True, "executors": 3, "builders": 0, "state_dir": "~/blocked"},
    ],
    ids=["state-dir-from-CELLBLOCK_STATE_DIR", "state-dir-from-c.Cellblock.state_dir"],
    indirect=True,
)
async def test_a_deployment_that_cannot_start_is_logged_and_the_server_serves_on(
    state_dir_from_environment: None,
    blocked: Path,
    caplog: pytest.LogCaptureFixture,
    jp_serverapp: Any,
    fetch: Fetch,
    until: Any,
) -> None:
    app = extension(jp_serverapp)
    assert Path(app.state_dir).expanduser() == blocked  # ~ expanded, however it was given
    deployment = app.deployment
    assert deployment is not None
    assert (deployment.state_dir, deployment.executors, deployment.builders) == (blocked, 3, 0)
    # Kernels started before it is up are pointed at the deployment's kernel directory.
    assert os.environ["CELLBLOCK_STATE_DIR"] == str(deployment.kernel_dir)
    [failure] = await until(
        lambda: said(caplog, "Cellblock: the local deployment did not start"),
        "the failed start to be logged",
    )
    assert failure.levelno == logging.ERROR and failure.exc_info is not None
    assert isinstance(failure.exc_info[1], OSError)  # the state directory could not be made
    assert backend_of(jp_serverapp) is None and "CELLBLOCK_URL" not in os.environ
    assert (await fetch(*API, "health")).code == 503
    assert (await fetch("")).code == 200
    await jp_serverapp.cleanup_extensions()  # stopping what never started is no error


# --- settings of the wrong kind ------------------------------------------------------------


@pytest.mark.parametrize(
    ("cellblock_config", "setting"),
    [
        (lambda svc: {"start_local": False, "executors": "two"}, "executors"),
        (lambda svc: {"start_local": "sometimes"}, "start_local"),
        (lambda svc: {"start_local": False, "url": 8765}, "url"),
    ],
    ids=["executors", "start_local", "url"],
    indirect=["cellblock_config"],
)
def test_a_setting_of_the_wrong_type_is_refused(
    jp_configurable_serverapp: Any, setting: str, capfd: pytest.CaptureFixture[str]
) -> None:
    # The server exits on the configuration error (traitlets' catch_config_error)...
    with pytest.raises(SystemExit):
        jp_configurable_serverapp()
    # The server's log (a stream handler of its own, on the standard error) says which.
    refused = "Bad config encountered during initialization: "
    assert f"{refused}The '{setting}' trait of a Cellblock instance" in capfd.readouterr().err
