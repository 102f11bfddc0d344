"""How a process reaches Redis (service/connection.py): the Sentinel URL, and what is refused."""

from __future__ import annotations

import re

import pytest

from cellblock.errors import ConfigError
from cellblock.service.connection import REPLICAS, SentinelUrl, connect


def test_a_sentinel_url_names_its_sentinels_service_database_and_password() -> None:
    url = SentinelUrl.parse("redis+sentinel://:p%40ss@10.0.0.1:26379,[::1]:26380/cellblock/2")
    assert url == SentinelUrl([("10.0.0.1", 26379), ("::1", 26380)], "cellblock", 2, "p@ss")
    assert SentinelUrl.parse("redis+sentinel://h:1/s") == SentinelUrl([("h", 1)], "s")


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("redis+sentinel://h:1", "give redis+sentinel://HOST:PORT"),
        ("redis+sentinel:///cellblock", "give redis+sentinel://HOST:PORT"),
        ("redis+sentinel://h/cellblock", "'h' is not HOST:PORT"),
        ("redis+sentinel://h:x/cellblock", "'h:x' is not HOST:PORT"),
        ("redis+sentinel://h:1/cellblock/zero", "the database 'zero' is not a number"),
    ],
)
def test_a_bad_sentinel_url_says_what_is_wrong(url: str, says: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(says)):
        SentinelUrl.parse(url)


async def test_only_sentinel_waits_for_replicas() -> None:
    plain = connect("unix:///tmp/nowhere.sock")
    await plain.close()
    assert (plain.replicas, plain.sentinels) == (0, ())
    sentinel = connect("redis+sentinel://127.0.0.1:1,127.0.0.1:2/cellblock")
    await sentinel.close()
    assert sentinel.replicas == REPLICAS and len(sentinel.sentinels) == 2
