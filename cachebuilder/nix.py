"""The Nix commands Cellblock runs, and nothing else: every Nix process starts here.

Names reach Nix only as a JSON file read by ``env.nix`` (``--argstr namesFile``), never as Nix
source. Every command runs with ``substituters`` set to the configured binary cache or to none,
because an unreachable default cache costs seconds of retries per build.

Cancellation: cancelling a coroutine here kills the Nix process it started.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import fcntl
import json
import os
import re
import signal
import subprocess
import tempfile
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from urllib.parse import urlsplit

from cellblock.cachebuilder.environments import Channel, Environment, Package
from cellblock.errors import CellblockError, ErrorCode

# The channel's real files, which Nix hashes into its identity and copies into the store: a
# strict editable install links each file into a tree of its own, and Nix hashes a link as a
# link, not as the file it names.
BUNDLED_CHANNEL = Path(__file__).resolve().with_name("channel")
GCROOTS = Path("/nix/var/nix/gcroots/cellblock")
#: A build failure's message names unknown attributes in JSON after this marker (env.nix).
_UNKNOWN = re.compile(r"cellblock-env: (.*?) \(channel [^)]*\) (\{.*\})")
_FAILED_BUILDER = re.compile(
    r"builder for '/nix/store/[a-z0-9]{32}-([^']+)\.drv' failed with exit code (\d+)"
)


class NixError(CellblockError):
    code: str = ErrorCode.NIX

    def __init__(self, message: str, log: str = "") -> None:
        super().__init__(message)
        self.log = log


def nix_environment(
    substituter: str = "", netrc: Path | None = None, cache_home: Path | None = None
) -> dict[str, str]:
    """The environment of a Nix command: ``substituter`` the only binary cache, reached with
    the credentials of the file ``netrc``; Nix's own cache of what binary caches hold in
    ``cache_home`` if given (see ``substitute``)."""
    env = dict(os.environ)
    if cache_home is not None:
        env["XDG_CACHE_HOME"] = str(cache_home)
    settings = [f"substituters = {substituter}"]
    if substituter:
        # A cache of our own builders is unsigned; its trust comes from being ours.
        settings.append("require-sigs = false")
    if netrc is not None:
        settings.append(f"netrc-file = {netrc}")
    env["NIX_CONFIG"] = "\n".join(settings)
    return env


def write_netrc(path: Path, substituter: str, token: str) -> Path:
    """The credentials Nix sends the service's binary cache (HTTP Basic, the token as the
    password), in a file only this user reads; ``path``."""
    host = urlsplit(substituter).hostname
    if not host:
        raise NixError(f"the substituter {substituter!r} is not a URL with a host")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f"machine {host} login cellblock password {token}\n")
    os.chmod(path, 0o600)  # an older file keeps its mode through O_CREAT
    return path


def _die_with_parent() -> None:
    # A builder killed with SIGKILL must not leave its nix-build running on.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


async def run(
    argv: Sequence[str],
    *,
    on_line: Callable[[str], Awaitable[None]] | None = None,
    substituter: str = "",
    netrc: Path | None = None,
    cache_home: Path | None = None,
) -> tuple[int, str, str]:
    """Run a Nix command; stream its stderr lines to ``on_line``; return (status, out, err)."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        env=nix_environment(substituter, netrc, cache_home),
        preexec_fn=_die_with_parent,
    )
    assert proc.stdout and proc.stderr
    err_lines: list[str] = []

    async def read_err() -> None:
        assert proc.stderr
        async for raw in proc.stderr:
            line = raw.decode(errors="replace").rstrip("\n")
            err_lines.append(line)
            if on_line is not None:
                await on_line(line)

    try:
        out, _ = await asyncio.gather(proc.stdout.read(), read_err())
        status = await proc.wait()
    except asyncio.CancelledError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise
    return status, out.decode(errors="replace"), "\n".join(err_lines)


def bundled_channel_setup() -> None:
    """Record the host tools' versions for the bundled channel (its setup.sh)."""
    result = subprocess.run(
        ["sh", str(BUNDLED_CHANNEL / "setup.sh")], capture_output=True, text=True
    )
    if result.returncode != 0:
        raise NixError(f"the bundled channel's setup failed: {result.stderr.strip()}")


async def prepare_channel(path: str, *, bundled: bool) -> Channel:
    """The channel at ``path`` with its identity, after the bundled channel's setup.

    Builders on one host start together (``cellblock up``), and setup.sh writes a temporary
    file into the very directory whose contents are the identity: a builder hashing it then
    publishes a bogus identity, so keys that match no other builder's. An exclusive ``flock``
    on the channel directory makes setup and hashing one step among this host's builders.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as exc:
        raise NixError(f"{path} is not a Nix channel: {exc.strerror}") from None
    try:
        await asyncio.to_thread(fcntl.flock, fd, fcntl.LOCK_EX)
        if bundled:
            await asyncio.to_thread(bundled_channel_setup)
        return await channel_info(path)
    finally:
        os.close(fd)  # releases the lock


async def channel_info(path: str) -> Channel:
    """The channel at ``path`` with its identity: the hash of its contents (NAR hash)."""
    if not Path(path, "default.nix").exists():
        raise NixError(f"{path} is not a Nix channel (no default.nix)")
    status, out, err = await run(["nix-hash", "--type", "sha256", "--base32", path])
    if status != 0:
        raise NixError(f"cannot hash the channel {path}: {err.strip()}")
    status, system, err = await run(
        ["nix-instantiate", "--eval", "--json", "--expr", "builtins.currentSystem"]
    )
    if status != 0:
        raise NixError(f"cannot ask Nix for the system: {err.strip()}")
    return Channel(path=path, identity=out.strip(), system=json.loads(system))


async def build_environment(
    channel: Channel,
    key: str,
    names: Sequence[str],
    on_line: Callable[[str], Awaitable[None]] | None = None,
) -> Environment:
    """One ``nix-build`` of the environment of ``names``, rooted against garbage collection."""
    GCROOTS.mkdir(parents=True, exist_ok=True)
    env_nix = Path(channel.path, "env.nix")
    if not env_nix.exists():
        env_nix = BUNDLED_CHANNEL / "env.nix"  # a nixpkgs checkout has no env.nix of its own
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(sorted(set(names)), f)
    try:
        status, out, err = await run(
            ["nix-build", str(env_nix), "--argstr", "channel", channel.path,
             "--argstr", "namesFile", f.name, "--out-link", str(GCROOTS / key)],
            on_line=on_line,
        )  # fmt: skip
    finally:
        os.unlink(f.name)
    if status != 0:
        raise NixError(_failure_message(err), log=err)
    out_path = Path(out.strip().splitlines()[-1])
    variables = json.loads((out_path / "env.json").read_text())
    closure = json.loads((out_path / "closure.json").read_text())
    packages = [
        Package(name=p["attr"], version=p["version"], store_path=p["store_path"])
        for p in json.loads((out_path / "packages.json").read_text())
    ]
    return Environment(
        key=key,
        names=tuple(sorted(set(names))),
        variables=variables,
        closure=tuple(closure),
        packages=tuple(packages),
        store_path=str(out_path),
        closure_sizes=await path_sizes(closure),
    )


def _failure_message(err: str) -> str:
    match = _UNKNOWN.search(err)
    if match:
        details = json.loads(match.group(2))
        parts = []
        if details.get("unknown_packages"):
            parts.append("unknown package(s): " + ", ".join(details["unknown_packages"]))
        if details.get("not_packages"):
            parts.append("not a package: " + ", ".join(details["not_packages"]))
        if details.get("malformed_names"):
            parts.append("malformed name(s): " + ", ".join(details["malformed_names"]))
        return "; ".join(parts) or match.group(1)
    builders = _FAILED_BUILDER.findall(err)
    if builders:
        names = ", ".join(f"{name} (exit code {code})" for name, code in builders)
        return f"the build of {names} failed; its output is in the log"
    errors = [line.split("error:", 1)[1].strip() for line in err.splitlines() if "error:" in line]
    return "the build failed: " + (errors[-1] if errors else "see the log")


async def path_sizes(paths: Sequence[str]) -> dict[str, int]:
    """The NAR size of each store path."""
    if not paths:
        return {}
    status, out, err = await run(["nix-store", "--query", "--size", *paths])
    if status != 0:
        raise NixError(f"cannot size store paths: {err.strip()}")
    return dict(zip(paths, (int(n) for n in out.split()), strict=True))


async def copy_to_binary_cache(store_path: str, cache_dir: Path) -> None:
    """Put a closure into a file binary cache, for executors on other hosts."""
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a NixError, so that the build fails rather than the builder
        raise NixError(
            f"cannot copy {store_path} to the binary cache {cache_dir}: {exc.strerror}"
        ) from None
    status, _, err = await run(
        ["nix", "--extra-experimental-features", "nix-command", "copy",
         "--to", f"file://{cache_dir}", store_path]
    )  # fmt: skip
    if status != 0:
        raise NixError(f"cannot copy {store_path} to the binary cache: {err.strip()}")


async def substitute(
    paths: Sequence[str],
    substituter: str,
    netrc: Path | None = None,
    cache_home: Path | None = None,
) -> None:
    """Fetch store paths this host lacks from the builders' binary cache.

    Nix 2.8 records what it learns of a binary cache in an SQLite file under ``cache_home``
    (default ``~/.cache``), and two fetches at once from one cache can fail there on a
    constraint: give each process a ``cache_home`` of its own, and run one fetch at a time in it.
    """
    argv = ["nix-store", "--realise", *paths]
    status, _, err = await run(argv, substituter=substituter, netrc=netrc, cache_home=cache_home)
    if status != 0:
        raise NixError(f"cannot fetch {len(paths)} store path(s) from {substituter}: {err.strip()}")


async def delete(env: Environment) -> None:
    """Unroot an environment and delete the store paths nothing else keeps alive."""
    with contextlib.suppress(FileNotFoundError):
        (GCROOTS / env.key).unlink()
    # The environment first, then its closure: --delete refuses any path still reachable from
    # a root (another environment's, a user's), so only what this one alone kept goes.
    for path in (env.store_path, *env.closure):
        await run(["nix-store", "--delete", path])
