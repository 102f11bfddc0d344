"""Tokens, roles and ownership: the service's authentication and who may see what."""

from __future__ import annotations

import itertools
import json
import stat
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from restio import ADMIN, ALICE, BOB, Rest

from cellblock import config as config_module
from cellblock.errors import ConfigError
from cellblock.service.auth import Principal, Tokens, ensure_token_files, load_tokens


@pytest.fixture
async def http(service: Any) -> AsyncIterator[Rest]:
    client = Rest(service.url)
    yield client
    client.close()


# -- tokens over HTTP -------------------------------------------------------------------------

TOKEN_NEEDED = [
    ("POST", "/api/v1/submissions", {"run": "true"}),
    ("GET", "/api/v1/submissions", None),
    ("GET", "/api/v1/submissions/someid", None),
    ("DELETE", "/api/v1/submissions/someid", None),
    ("GET", "/api/v1/submissions/someid/events", None),
    ("GET", "/api/v1/workers", None),
    ("DELETE", "/api/v1/workers/someworker", None),
    ("POST", "/api/v1/admin/scale", {"executors": 1}),
    ("GET", "/metrics", None),
    ("GET", "/api/v1/openapi.json", None),
]


BAD_AUTHORIZATION = [
    {},
    {"Authorization": "Bearer nope"},
    {"Authorization": "Bearer "},
    {"Authorization": "Basic YWxpY2U6YWxpY2UtdG9rZW4="},
    {"Authorization": ALICE},
    {"Authorization": f"Bearer {ALICE}2"},
    {"Authorization": f"Bearer {ALICE[:-1]}"},
]


async def test_no_or_a_bad_token_is_401(http: Rest) -> None:
    for (method, path, body), headers in itertools.product(TOKEN_NEEDED, BAD_AUTHORIZATION):
        response = await http.request(method, path, body, token=None, headers=headers)
        assert response.code == 401, (method, path, headers, response.body)
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
        assert response.headers["Content-Type"] == "application/json; charset=utf-8"
        assert json.loads(response.body)["error"]["code"] == "unauthorized"


async def test_a_refused_submission_is_not_stored(http: Rest, store: Any) -> None:
    await http.call("POST", "/api/v1/submissions", {"run": "true"}, token="nope", expect=401)
    assert await store.queued() == 0 and (await store.counters()).get("submitted", 0) == 0


async def test_the_bearer_scheme_is_case_insensitive(http: Rest) -> None:
    for scheme in ("bearer", "BEARER", "Bearer"):
        await http.call(
            "GET", "/api/v1/submissions", token=None, headers={"Authorization": f"{scheme} {BOB}"}
        )


async def test_the_token_query_parameter_authenticates(http: Rest) -> None:
    answer = await http.call("POST", f"/api/v1/submissions?token={BOB}", {"run": "true"},
                             token=None, expect=201)  # fmt: skip
    listed = await http.call("GET", f"/api/v1/submissions?token={BOB}", token=None)
    assert [s["id"] for s in listed["submissions"]] == [answer["id"]]
    await http.call("GET", "/api/v1/workers?token=admin-token", token=None)
    await http.call("GET", "/api/v1/submissions?token=nope", token=None, expect=401)


async def test_health_needs_no_token_even_a_wrong_one(http: Rest) -> None:
    assert (await http.call("GET", "/api/v1/health", token=None))["status"] == "ok"
    assert (await http.call("GET", "/api/v1/health", token="nope"))["status"] == "ok"


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("GET", "/api/v1/workers", None),
        ("DELETE", "/api/v1/workers/someworker", None),
        ("POST", "/api/v1/admin/scale", {"executors": 1}),
        ("GET", "/metrics", None),
    ],
)
async def test_a_client_token_is_403_on_admin_endpoints(
    http: Rest, method: str, path: str, body: Any
) -> None:
    answer = await http.call(method, path, body, token=ALICE, expect=403)
    assert answer["error"]["code"] == "forbidden"
    # The admin token passes the same check (what follows depends on the endpoint).
    response = await http.request(method, path, body, token=ADMIN)
    assert response.code not in (401, 403)


# -- ownership --------------------------------------------------------------------------------


async def test_someone_elses_id_answers_exactly_as_an_unknown_id(http: Rest) -> None:
    sid = (await http.call("POST", "/api/v1/submissions", {"run": "true"}, expect=201))["id"]
    unknown = "u" * len(sid)
    for method, suffix in (("GET", ""), ("GET", "/events"), ("DELETE", "")):
        theirs = await http.request(method, f"/api/v1/submissions/{sid}{suffix}", token=BOB)
        nothing = await http.request(method, f"/api/v1/submissions/{unknown}{suffix}", token=BOB)
        assert theirs.code == nothing.code == 404, (method, suffix)
        assert theirs.body.replace(sid.encode(), b"ID") == nothing.body.replace(
            unknown.encode(), b"ID"
        )
        for header in ("Content-Type", "Cache-Control"):
            assert theirs.headers.get(header) == nothing.headers.get(header)
    # bob's DELETE did nothing; bob's list does not show it.
    assert (await http.call("GET", f"/api/v1/submissions/{sid}"))["status"] == "queued"
    assert (await http.call("GET", "/api/v1/submissions", token=BOB))["submissions"] == []


async def test_an_admin_can_see_and_cancel_anyones_submission(http: Rest) -> None:
    sid = (await http.call("POST", "/api/v1/submissions", {"run": "true"}, expect=201))["id"]
    state = await http.call("GET", f"/api/v1/submissions/{sid}", token=ADMIN)
    assert state == await http.call("GET", f"/api/v1/submissions/{sid}")
    answer = await http.call("DELETE", f"/api/v1/submissions/{sid}", token=ADMIN)
    assert answer == {"id": sid, "status": "cancelled"}
    events = await http.request("GET", f"/api/v1/submissions/{sid}/events", token=ADMIN)
    assert events.code == 200 and b"event: finished" in events.body
    # The submission stays alice's: she sees it cancelled; bob still cannot.
    assert (await http.call("GET", f"/api/v1/submissions/{sid}"))["status"] == "cancelled"
    await http.call("GET", f"/api/v1/submissions/{sid}", token=BOB, expect=404)


async def test_an_owner_can_see_and_cancel_their_own(http: Rest) -> None:
    sid = (await http.call("POST", "/api/v1/submissions", {"run": "true"}, token=BOB,
                           expect=201))["id"]  # fmt: skip
    assert (await http.call("GET", f"/api/v1/submissions/{sid}", token=BOB))["id"] == sid
    await http.call("GET", f"/api/v1/submissions/{sid}", token=ALICE, expect=404)
    await http.call("DELETE", f"/api/v1/submissions/{sid}", token=BOB)


# -- the token table --------------------------------------------------------------------------


def test_tokens_authenticate_exact_matches_only() -> None:
    tokens = Tokens({"s3cret": Principal("ann", "client"), "r00t": Principal("root", "admin")})
    assert tokens.authenticate("s3cret") == Principal("ann", "client")
    assert tokens.authenticate("r00t") == Principal("root", "admin")
    assert tokens.authenticate("r00t").is_admin  # type: ignore[union-attr]
    assert not Principal("ann", "client").is_admin
    for wrong in ("", None, "s3cre", "s3crett", "S3CRET", " s3cret", "s3cret\n", "é"):
        assert tokens.authenticate(wrong) is None, wrong


def test_no_tokens_at_all_is_a_configuration_error() -> None:
    with pytest.raises(ConfigError):
        Tokens({})


def test_ensure_token_files_writes_mode_0600_and_keeps_them(tmp_path: Path) -> None:
    written = ensure_token_files(tmp_path)
    assert set(written) == {"client", "admin"} and written["client"] != written["admin"]
    for role, name in (("client", "token"), ("admin", "admin-token")):
        path = tmp_path / name
        assert path.read_text() == written[role] + "\n"  # type: ignore[index]
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert len(written[role]) >= 32  # type: ignore[index]
    # Run again: the same tokens; given ones replace them.
    assert ensure_token_files(tmp_path) == written
    given = ensure_token_files(tmp_path, client="mine", admin="boss")
    assert given == {"client": "mine", "admin": "boss"}
    assert (tmp_path / "token").read_text() == "mine\n"


def test_ensure_token_files_tightens_an_existing_files_mode(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("old\n")
    path.chmod(0o644)
    assert ensure_token_files(tmp_path)["client"] == "old"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_load_tokens_reads_config_environment_and_files(tmp_path: Path) -> None:
    (tmp_path / "cellblock.toml").write_text(
        '[tokens.carol]\ntoken = "carol-token"\n[tokens.ops]\ntoken = "ops-token"\nrole = "admin"\n'
    )
    ensure_token_files(tmp_path, client="file-client", admin="file-admin")
    config = config_module.load(tmp_path, environ={})
    tokens = load_tokens(config, environ={"CELLBLOCK_TOKEN": "env-client"})
    assert tokens.authenticate("carol-token") == Principal("carol", "client")
    assert tokens.authenticate("ops-token") == Principal("ops", "admin")
    assert tokens.authenticate("env-client") == Principal("client", "client")
    assert tokens.authenticate("file-client") == Principal("client", "client")
    assert tokens.authenticate("file-admin") == Principal("admin", "admin")
    assert tokens.authenticate("env-admin") is None


def test_load_tokens_with_none_configured_fails(tmp_path: Path) -> None:
    config = config_module.load(tmp_path, environ={})
    with pytest.raises(ConfigError):
        load_tokens(config, environ={})
    tokens = load_tokens(config, environ={"CELLBLOCK_ADMIN_TOKEN": "a"})
    assert tokens.authenticate("a") == Principal("admin", "admin")
