"""The packages API and the binary cache, through the real service, real builders (real
nix-build of the bundled offline channel) and real Nix substitution over HTTP.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import tornado.httpserver
import tornado.netutil
from restio import ALICE, Rest

from cellblock import config as config_module
from cellblock.cachebuilder import nix
from cellblock.cachebuilder.environments import EnvironmentCache, environment_key
from cellblock.executor.deps import NixDependencies
from cellblock.service.auth import Principal, Tokens
from cellblock.service.protocol import OutputEvent
from cellblock.service.server import make_app
from cellblock.service.store import Store

TOKENS = {"alice-token": Principal("alice", "client"), "admin-token": Principal("admin", "admin")}
#: Names carrying Nix syntax (or too deep): refused before they come near Nix.
BAD_NAMES = [
    "a; builtins.readFile /etc/shadow",
    "${builtins.readFile /etc/shadow}",
    "a.b.c.d.e",
    "busybox'",
    "",
]


class Api(Rest):
    async def build_ends(self, build: str, timeout: float = 30) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            status: dict[str, Any] = await self.call("GET", f"/api/v1/packages/builds/{build}")
            if status["status"] != "building":
                return status
            assert time.monotonic() < deadline, f"build {build} did not end: {status}"
            await asyncio.sleep(0.05)


@pytest.fixture
async def api(service: Any) -> AsyncIterator[Api]:
    client = Api(service.url)
    yield client
    client.close()


# -- listing and prefetching --------------------------------------------------------------------


async def test_packages_need_a_token(api: Api) -> None:
    for method, body in (("GET", None), ("POST", {"names": ["busybox"]})):
        response = await api.request(method, "/api/v1/packages", body, token=None)
        assert response.code == 401
        response = await api.request(method, "/api/v1/packages", body, token="nope")
        assert response.code == 401


async def test_before_any_builder_started_prefetch_is_503_and_the_list_empty(api: Api) -> None:
    answer = await api.call("POST", "/api/v1/packages", {"names": ["busybox"]}, expect=503)
    assert answer["error"]["code"] == "no_builder"
    # Like the full queue's 429, it says when to retry (its absence was found by fuzzing).
    response = await api.request("POST", "/api/v1/packages", {"names": ["busybox"]})
    assert int(response.headers["Retry-After"]) > 0
    assert await api.call("GET", "/api/v1/packages") == {"packages": []}


@pytest.mark.timeout(60)
async def test_prefetch_builds_then_lists_then_answers_cached(
    api: Api, start_builder, store: Store
) -> None:
    builder = start_builder()
    await builder.started()
    names = ["gcc", "busybox"]
    response = await api.request("POST", "/api/v1/packages", {"names": names})
    assert response.code == 202, response.body
    answer = json.loads(response.body)
    build = answer["id"]
    assert answer["status"] == "building" and len(answer["key"]) == 32
    assert response.headers["Location"] == f"/api/v1/packages/builds/{build}"
    # Asked again while it builds: the same build.
    again = await api.call("POST", "/api/v1/packages", {"names": ["busybox", "gcc"]}, expect=202)
    assert again["id"] == build
    status = await api.build_ends(build)
    assert status["status"] == "ok" and status["id"] == build, status
    assert status["log"][0] == "queued: busybox, gcc"
    assert len(builder.events("build started")) == 1

    cached = await api.call("POST", "/api/v1/packages", {"names": ["busybox", "gcc", "gcc"]})
    assert cached["status"] == "cached" and cached["key"] == answer["key"]
    listed = (await api.call("GET", "/api/v1/packages"))["packages"]
    assert [p["name"] for p in listed] == ["busybox", "gcc"]
    assert cached["packages"] == [
        {k: p[k] for k in ("name", "version", "store_path")} for p in listed
    ]
    versions = json.loads((nix.BUNDLED_CHANNEL / "versions.json").read_text())["versions"]
    for package in listed:
        assert set(package) == {
            "name", "version", "store_path", "size", "cached_at", "last_used", "uses"
        }  # fmt: skip
        assert package["version"] == versions[package["name"]]
        assert package["store_path"].endswith(f"-{package['name']}-{package['version']}")
        assert os.path.isdir(package["store_path"])
        assert package["size"] > 0 and package["cached_at"].endswith("Z")
        assert package["uses"] == 0 and package["last_used"] is None
    # A deps stage uses the prefetched environment: a hit, counted.
    outcome = await NixDependencies(EnvironmentCache(store)).provide(names, 10, lambda e: None)
    assert outcome.result.cache == "hit"
    listed = (await api.call("GET", "/api/v1/packages"))["packages"]
    assert all(p["uses"] == 1 and p["last_used"] for p in listed)


async def test_a_prefetch_of_an_unknown_package_ends_failed_naming_it(
    api: Api, start_builder
) -> None:
    await start_builder().started()
    answer = await api.call(
        "POST", "/api/v1/packages", {"names": ["busybox", "nosuch"]}, expect=202
    )
    status = await api.build_ends(answer["id"])
    assert status["status"] == "failed"
    assert status["message"] == "unknown package(s): nosuch"
    assert await api.call("GET", "/api/v1/packages") == {"packages": []}


async def test_an_unknown_build_is_404(api: Api) -> None:
    answer = await api.call("GET", "/api/v1/packages/builds/0123456789abcdef", expect=404)
    assert answer["error"]["code"] == "not_found"


async def test_names_with_nix_syntax_are_422_before_any_nix_runs(
    api: Api, start_builder, store: Store, popen_spy
) -> None:
    builder = start_builder()
    await builder.started()
    cache = EnvironmentCache(store)
    for name in BAD_NAMES:
        body = {"names": ["busybox", name]}
        answer = await api.call("POST", "/api/v1/packages", body, expect=422)
        assert [d["field"] for d in answer["error"]["details"]] == ["names[1]"], name
        submission = {"dependencies": [name, "busybox"], "run": "true"}
        answer = await api.call("POST", "/api/v1/submissions", submission, expect=422)
        assert [d["field"] for d in answer["error"]["details"]] == ["dependencies[0]"], name
    # Nothing was queued, for the builders or the executors, and no Nix ran here.
    assert await cache.redis.xlen(cache.builds_key) == 0
    assert await store.queued() == 0
    assert popen_spy.nix() == []
    await asyncio.sleep(0.3)
    assert builder.events("build started") == []


@pytest.mark.parametrize(
    ("raw", "code"),
    [(b"{}", 422), (b'{"names": []}', 422), (b'{"names": "busybox"}', 422),
     (b'{"names": [1]}', 422), (b'{"names": ["busybox"], "extra": 1}', 422), (b"[]", 422),
     (b"null", 422), (b"{not json", 400)],
)  # fmt: skip
async def test_a_malformed_prefetch_is_refused(api: Api, raw: bytes, code: int) -> None:
    response = await api.request("POST", "/api/v1/packages", raw=raw)
    assert response.code == code, response.body
    assert "error" in json.loads(response.body)


# -- the binary cache ---------------------------------------------------------------------------


@pytest.fixture
async def cache_service(
    redis_url: str, tmp_path: Path, sandbox_root: Path
) -> AsyncIterator[tuple[str, Path]]:
    """The real service configured with a binary cache directory: (URL, directory)."""
    binary_cache = tmp_path / "binary-cache"
    env = {
        "CELLBLOCK_CACHE__BINARY_CACHE": f'"{binary_cache}"',
        "CELLBLOCK_SANDBOX__ROOT": f'"{sandbox_root}"',
    }
    state = tmp_path / "service-state"
    state.mkdir()
    cfg = config_module.load(state, environ=env)
    store = Store.connect(redis_url)
    server = tornado.httpserver.HTTPServer(make_app(store, cfg, Tokens(TOKENS)))
    [sock] = tornado.netutil.bind_sockets(0, "127.0.0.1", family=socket.AF_INET)
    server.add_sockets([sock])
    yield f"http://127.0.0.1:{sock.getsockname()[1]}", binary_cache
    server.stop()
    await server.close_all_connections()
    await store.close()


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


@pytest.mark.timeout(90)
async def test_builds_land_in_the_binary_cache_served_over_http_and_substitute_back(
    cache_service: tuple[str, Path],
    start_builder,
    store: Store,
    tmp_path: Path,
) -> None:
    url, binary_cache = cache_service
    api = Api(url)
    try:
        await start_builder(CELLBLOCK_CACHE__BINARY_CACHE=f'"{binary_cache}"').started()
        cache = EnvironmentCache(store)
        names = ["slow-example"]  # a new store path: deletable from the local store
        answer = await api.call("POST", "/api/v1/packages", {"names": names}, expect=202)
        assert (await api.build_ends(answer["id"]))["status"] == "ok"
        channel = await cache.channel()
        assert channel is not None
        env = await cache.get(environment_key(channel, names))
        assert env is not None

        # The builder put the whole closure into the file binary cache.
        assert "StoreDir: /nix/store" in (binary_cache / "nix-cache-info").read_text()
        narinfos = {p.name for p in binary_cache.glob("*.narinfo")}
        assert {f"{Path(p).name[:32]}.narinfo" for p in env.closure} <= narinfos

        # The service serves it, to a token holder only (Nix speaks HTTP Basic: token as password).
        info = "/nix-cache/nix-cache-info"
        denied = await api.request("GET", info, token=None)
        assert denied.code == 401 and denied.headers["WWW-Authenticate"].startswith("Basic ")
        assert (await api.request("GET", info, token=None, headers=basic("x", "nope"))).code == 401
        served = await api.request("GET", info, token=None, headers=basic("nix", ALICE))
        assert served.code == 200 and served.body == (binary_cache / "nix-cache-info").read_bytes()
        narinfo = f"/nix-cache/{Path(env.store_path).name[:32]}.narinfo"
        served = await api.request("GET", narinfo, token=None, headers=basic("", ALICE))
        assert served.code == 200 and f"StorePath: {env.store_path}\n" in served.body.decode()
        assert (await api.request("GET", narinfo, token=ALICE)).code == 200  # Bearer works too

        # This host loses the closure (as an executor on another host never had it).
        await nix.delete(env)
        assert not any(os.path.exists(p) for p in env.closure)
        alone = await NixDependencies(cache).provide(names, 20, lambda e: None)
        assert alone.result.status == "failed"
        assert alone.result.message == (
            f"{len(env.closure)} store path(s) are missing here and no substituter is set"
        )
        # Without credentials, Nix cannot fetch from the service.
        substituter = f"{url}/nix-cache"
        refused = await NixDependencies(cache, substituter).provide(names, 20, lambda e: None)
        assert refused.result.status == "failed"
        assert refused.result.message.startswith(
            f"cannot fetch {len(env.closure)} store path(s) from {substituter}"
        )
        assert "does not appear to be a binary cache" in refused.result.message  # the 401
        # With the token (an executor's cache.substituter_token, written as Nix's netrc), the
        # deps stage fetches the closure back.
        netrc = nix.write_netrc(tmp_path / "netrc", substituter, ALICE)
        lines: list[str] = []
        fetched = await NixDependencies(cache, substituter, netrc).provide(
            names, 20, lambda e: lines.append(e.data if isinstance(e, OutputEvent) else "")
        )
        assert fetched.result.status == "ok" and fetched.result.cache == "hit"
        assert lines == [f"fetching {len(env.closure)} store path(s) from {substituter}\n"]
        assert all(os.path.exists(p) for p in env.closure)
        assert json.loads(Path(env.store_path, "env.json").read_text()) == dict(env.variables)
    finally:
        api.close()
