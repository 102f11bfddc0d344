"""The packages API: the cache's index, prefetching, build status, and the binary cache.

``GET /api/v1/packages`` lists what the cache holds; ``POST /api/v1/packages`` builds a package
set ahead of use (``200`` when it is cached already, else ``202`` with a build id whose status
``GET /api/v1/packages/builds/{id}`` answers). ``/nix-cache/`` serves the builders' binary cache
to executors on other hosts; Nix authenticates there with HTTP Basic, the token as password.
"""

from __future__ import annotations

import base64

import tornado.web

from cellblock.cachebuilder.environments import EnvironmentCache, environment_key
from cellblock.errors import ErrorCode, ErrorResponse
from cellblock.service.api import BaseHandler
from cellblock.service.protocol import PackagesRequest, parse_packages_request
from cellblock.service.submissions import RETRY_AFTER

#: How long a prefetch build may hold its package set before another may start one.
BUILD_TTL = 3600.0


class PackagesHandler(BaseHandler):
    async def get(self) -> None:
        self.authenticate()
        cache = EnvironmentCache(self.services.store)
        self.send_json(200, {"packages": await cache.packages()})

    async def post(self) -> None:
        self.authenticate()
        request: PackagesRequest = parse_packages_request(self.json_body())
        cache = EnvironmentCache(self.services.store)
        channel = await cache.channel()
        if channel is None:
            raise ErrorResponse(
                503,
                ErrorCode.NO_BUILDER,
                "no cache builder has started yet; retry later",
                headers={"Retry-After": str(RETRY_AFTER)},
            )
        key = environment_key(channel, request.names)
        env = await cache.get(key)
        if env is not None:
            packages = [p.as_json() for p in env.packages]
            self.send_json(200, {"status": "cached", "key": key, "packages": packages})
            return
        build = await cache.request_build(key, request.names, ttl=BUILD_TTL)
        self.set_header("Location", f"/api/v1/packages/builds/{build}")
        self.send_json(202, {"id": build, "status": "building", "key": key})


class BuildHandler(BaseHandler):
    async def get(self, build: str) -> None:
        self.authenticate()
        status = await EnvironmentCache(self.services.store).build_status(build)
        if status is None:
            raise ErrorResponse(404, ErrorCode.NOT_FOUND, f"no build {build}")
        self.send_json(200, status)


class BinaryCacheHandler(tornado.web.StaticFileHandler):
    """The builders' ``nix copy --to file://`` directory, read-only, behind the API tokens."""

    def prepare(self) -> None:
        header = self.request.headers.get("Authorization", "")
        token = None
        if header.lower().startswith("bearer "):
            token = header[7:].strip()
        elif header.lower().startswith("basic "):
            try:
                token = base64.b64decode(header[6:]).decode().partition(":")[2]
            except (ValueError, UnicodeDecodeError):
                token = None
        if self.settings["services"].tokens.authenticate(token) is None:
            # Answered here rather than raised: send_error clears every header set before it,
            # and a 401 without its challenge leaves a client not knowing to send Basic.
            self.set_status(401)
            self.set_header("WWW-Authenticate", 'Basic realm="cellblock nix cache"')
            self.finish()
