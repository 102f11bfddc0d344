"""The Nix commands, run for real: nix-build of the bundled offline channel's environments, the
GC roots, sizes, the binary cache, substitution, deletion and cancellation.

Only environments that hold ``slow-example`` (a new store path at every evaluation) are ever
deleted from the store: every other path here may be in use by another environment.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from cellblock.cachebuilder import nix
from cellblock.cachebuilder.environments import Channel, Environment, environment_key

BROKEN_LINE = "broken-example: this package always fails to build (on purpose, for tests)"


async def build(channel: Channel, names: list[str]) -> Environment:
    return await nix.build_environment(channel, environment_key(channel, names), names)


def store_query(*args: str) -> list[str]:
    out = subprocess.run(
        ["nix-store", "--query", *args], capture_output=True, text=True, check=True
    ).stdout
    return out.split()


def busybox_version(store_path: str) -> str:
    """What the store's busybox says its version is ("BusyBox v1.35.0 (Debian ...)")."""
    banner = subprocess.run(
        [f"{store_path}/bin/busybox"], capture_output=True, text=True
    ).stdout.splitlines()[0]
    return banner.split()[1].removeprefix("v")


# -- a build ------------------------------------------------------------------------------------


async def test_one_nix_build_makes_a_rooted_environment_with_its_closure(
    channel: Channel, popen_spy
) -> None:
    env = await build(channel, ["busybox"])
    # One nix-build (the evaluation validates every name), then one query of the sizes.
    assert [argv[0] for argv in popen_spy.nix()] == ["nix-build", "nix-store"]
    assert popen_spy.nix()[1][:3] == ["nix-store", "--query", "--size"]
    assert env.key == environment_key(channel, ["busybox"]) and env.names == ("busybox",)
    [package] = env.packages
    assert package.name == "busybox"
    assert package.version == busybox_version(package.store_path) == "1.35.0"
    assert package.store_path.startswith("/nix/store/") and package.store_path.endswith(
        f"-busybox-{package.version}"
    )
    root = nix.GCROOTS / env.key
    assert root.is_symlink() and os.readlink(root) == env.store_path
    assert sorted(env.closure) == sorted(store_query("--requisites", env.store_path))
    assert set(env.closure) == {env.store_path, package.store_path}
    sizes = dict(zip(env.closure, map(int, store_query("--size", *env.closure)), strict=True))
    assert env.closure_sizes == sizes and env.size == sum(sizes.values())
    assert env.variables == {"PATH": f"{package.store_path}/bin"}
    # The environment works with nothing but its PATH.
    shout = subprocess.run(
        [f"{package.store_path}/bin/sh", "-c", "echo hi | tr a-z A-Z"],
        env={"PATH": env.variables["PATH"]}, capture_output=True, text=True,
    )  # fmt: skip
    assert shout.stdout == "HI\n"


async def test_the_same_set_builds_the_same_environment(channel: Channel) -> None:
    one = await build(channel, ["gcc", "busybox"])
    two = await nix.build_environment(channel, one.key, ["busybox", "gcc", "busybox"])
    assert two.store_path == one.store_path and two.closure == one.closure
    assert [p.name for p in one.packages] == ["busybox", "gcc"]
    # Search paths follow the sorted names: busybox's tools come before gcc's.
    gcc = next(p for p in one.packages if p.name == "gcc")
    busybox = next(p for p in one.packages if p.name == "busybox")
    assert one.variables["PATH"] == f"{busybox.store_path}/bin:{gcc.store_path}/bin"


async def test_build_lines_stream_to_the_callback(channel: Channel) -> None:
    lines: list[str] = []

    async def on_line(line: str) -> None:
        lines.append(line)

    with pytest.raises(nix.NixError):
        await nix.build_environment(channel, "x" * 32, ["broken-example"], on_line=on_line)
    assert BROKEN_LINE in lines
    assert any(line.startswith("building '/nix/store/") for line in lines)


# -- failures -----------------------------------------------------------------------------------


async def test_unknown_names_fail_in_one_evaluation_naming_every_one(
    channel: Channel, popen_spy
) -> None:
    names = ["busybox", "nosuch", "python3Packages.numpy", "busybox.meta"]
    key = environment_key(channel, names)
    with pytest.raises(nix.NixError) as caught:
        await nix.build_environment(channel, key, names)
    assert caught.value.message == (
        "unknown package(s): nosuch, python3Packages.numpy; not a package: busybox.meta"
    )
    assert "cellblock-env:" in caught.value.log
    assert len(popen_spy.nix()) == 1  # the one evaluation; nothing was built or sized
    assert not (nix.GCROOTS / key).is_symlink()


async def test_a_failing_package_build_fails_with_the_builders_output(channel: Channel) -> None:
    with pytest.raises(nix.NixError) as caught:
        await build(channel, ["busybox", "broken-example"])
    assert caught.value.message == (
        "the build of broken-example-1.0 (exit code 1) failed; its output is in the log"
    )
    assert BROKEN_LINE in caught.value.log.splitlines()


@pytest.mark.parametrize(
    "name", ["a; builtins.readFile /etc/shadow", "${builtins.readFile /etc/shadow}", "a b", ""]
)
async def test_env_nix_itself_refuses_a_malformed_name(channel: Channel, name: str) -> None:
    """Defence in depth: the service refuses these first, but env.nix never evaluates one."""
    with pytest.raises(nix.NixError) as caught:
        await nix.build_environment(channel, "m" * 32, ["busybox", name])
    assert caught.value.message == f"malformed name(s): {name}"
    shadow = Path("/etc/shadow").read_text()
    assert shadow.strip() and shadow.strip() not in caught.value.log


async def test_a_deep_dotted_name_is_looked_up_level_by_level(channel: Channel) -> None:
    # Well formed, so env.nix looks it up (the service caps the depth at four levels).
    with pytest.raises(nix.NixError, match=r"^unknown package\(s\): a\.b\.c\.d\.e$"):
        await build(channel, ["a.b.c.d.e"])


# -- sizes, the binary cache, substitution and deletion -------------------------------------------


async def test_path_sizes_are_the_nar_sizes(channel: Channel) -> None:
    env = await build(channel, ["busybox"])
    assert await nix.path_sizes([]) == {}
    sizes = await nix.path_sizes(list(env.closure))
    assert sizes == dict(
        zip(env.closure, map(int, store_query("--size", *env.closure)), strict=True)
    )
    with pytest.raises(nix.NixError, match="cannot size"):
        await nix.path_sizes(["/nix/store/00000000000000000000000000000000-nothing"])


@pytest.mark.timeout(60)
async def test_a_closure_goes_to_a_binary_cache_and_comes_back_after_deletion(
    channel: Channel, tmp_path: Path
) -> None:
    env = await build(channel, ["slow-example"])  # a new store path, deletable
    [slow] = env.packages
    stamp = Path(slow.store_path, "stamp").read_text()
    binary_cache = tmp_path / "binary-cache"
    await nix.copy_to_binary_cache(env.store_path, binary_cache)
    assert "StoreDir: /nix/store" in (binary_cache / "nix-cache-info").read_text()
    for path in env.closure:
        narinfo = (binary_cache / f"{Path(path).name[:32]}.narinfo").read_text()
        assert f"StorePath: {path}\n" in narinfo
    await nix.delete(env)
    assert not (nix.GCROOTS / env.key).is_symlink()
    assert not any(os.path.exists(p) for p in env.closure)
    await nix.substitute(list(env.closure), f"file://{binary_cache}")
    assert all(os.path.exists(p) for p in env.closure)
    assert Path(slow.store_path, "stamp").read_text() == stamp
    assert json.loads(Path(env.store_path, "closure.json").read_text()) == list(env.closure)


async def test_substitute_names_the_cache_it_could_not_fetch_from(tmp_path: Path) -> None:
    (tmp_path / "nix-cache-info").write_text("StoreDir: /nix/store\n")
    missing = "/nix/store/00000000000000000000000000000000-nothing"
    with pytest.raises(nix.NixError, match=f"from file://{tmp_path}"):
        await nix.substitute([missing], f"file://{tmp_path}")


# -- processes ----------------------------------------------------------------------------------


async def test_nix_runs_without_any_substituter_unless_one_is_given() -> None:
    assert nix.nix_environment()["NIX_CONFIG"] == "substituters = "
    config = nix.nix_environment("http://cache.example/nix-cache")["NIX_CONFIG"]
    assert config.splitlines() == [
        "substituters = http://cache.example/nix-cache",
        "require-sigs = false",
    ]
    status, out, _ = await nix.run(["nix", "--extra-experimental-features", "nix-command",
                                    "show-config"])  # fmt: skip
    assert status == 0
    assert "substituters = \n" in out


def test_a_fetch_keeps_its_binary_cache_records_where_it_is_told(tmp_path: Path) -> None:
    # Each executor its own: two processes' fetches at once fail on Nix's shared SQLite file.
    assert nix.nix_environment(cache_home=tmp_path)["XDG_CACHE_HOME"] == str(tmp_path)
    assert nix.nix_environment().get("XDG_CACHE_HOME") == os.environ.get("XDG_CACHE_HOME")


async def test_cancelling_a_build_kills_the_nix_process(channel: Channel, popen_spy) -> None:
    started = asyncio.Event()

    async def on_line(line: str) -> None:
        if line.startswith("slow-example: building"):
            started.set()

    task = asyncio.create_task(
        nix.build_environment(channel, "c" * 32, ["slow-example"], on_line=on_line)
    )
    await asyncio.wait_for(started.wait(), 20)
    [pid] = popen_spy.pids
    assert Path(f"/proc/{pid}").exists()
    began = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert time.monotonic() - began < 1  # killed, not waited for (the build takes 2 s)
    assert not Path(f"/proc/{pid}").exists()  # dead and reaped
    assert not (nix.GCROOTS / ("c" * 32)).is_symlink()


def test_a_substituters_token_goes_to_nix_as_a_private_netrc(tmp_path: Path) -> None:
    path = nix.write_netrc(tmp_path / "netrc", "http://cache.example:8765/nix-cache", "s3cret")
    assert path.read_text() == "machine cache.example login cellblock password s3cret\n"
    assert path.stat().st_mode & 0o777 == 0o600
    config = nix.nix_environment("http://cache.example:8765/nix-cache", path)["NIX_CONFIG"]
    assert f"netrc-file = {path}" in config.splitlines()
    with pytest.raises(nix.NixError, match="not a URL with a host"):
        nix.write_netrc(tmp_path / "bad", "/nix-cache", "s3cret")
