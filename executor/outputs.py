"""Output files (PROTOCOL.md, "Output files"): what a stage left in its working directory,
brought back as the request's ``outputs`` patterns name it.

Everything in a working directory after a stage was written by the sandbox and is hostile: a
name may be a symlink to a host file, a FIFO that blocks whoever opens it, a directory of a
million entries, or a file of the whole disk cap. So every path is opened with openat2(2)
beneath the working directory, resolving no symlink, magic link or mount crossing on the way
(``RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV``), without
blocking (``O_NONBLOCK``), and kept only when ``fstat`` of what was opened says it is a regular
file. Reads stop at the caps; listing a directory for a glob stops after ``MAX_ENTRIES``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ctypes
import errno
import fnmatch
import os
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from cellblock.service.protocol import OutputFile, SandboxResult, media_type

#: openat2(2): its syscall number (the same on x86-64 and arm64) and its resolve flags.
SYS_OPENAT2 = 437
RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
RESOLVE = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV
#: Directory entries looked at for all the glob patterns of one result, and files returned.
MAX_ENTRIES = 100_000
MAX_FILES = 1000
#: How much of a file decides its media type.
HEAD = 512
GLOB_CHARACTERS = frozenset("*?[")

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
#: What reading a file the sandbox left can fail with that is the host's trouble, not the
#: file's: anything else (a socket, a name too long, an I/O error) means "not a file to return".
HOST_ERRORS = frozenset((errno.EMFILE, errno.ENFILE, errno.ENOMEM))


class _OpenHow(ctypes.Structure):
    _fields_ = (("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64))


def open_beneath(root: int, path: str, flags: int) -> int:
    """``path`` opened relative to the directory ``root`` with openat2, never leaving it and
    never through a symlink; ``OSError`` (``ELOOP`` for a symlink, ``EXDEV`` for an escape)."""
    how = _OpenHow(flags | os.O_CLOEXEC | os.O_NOFOLLOW, 0, RESOLVE)
    fd = _libc.syscall(SYS_OPENAT2, root, os.fsencode(path), ctypes.byref(how), ctypes.sizeof(how))
    if fd < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), path)
    return int(fd)


@dataclass(frozen=True)
class Collected:
    files: list[OutputFile]
    missing: list[str]
    #: Bytes of content kept, all files together.
    kept: int = 0


def collect(workdir: str | os.PathLike[str], patterns: Sequence[str], file_cap: int,
            total_cap: int) -> Collected:  # fmt: skip
    """The regular files under ``workdir`` that ``patterns`` name, each read up to
    ``file_cap`` bytes and all of them up to ``total_cap``; the patterns that named none.
    Blocking: call it off the event loop for a large result."""
    root = os.open(workdir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        budget = _Budget(MAX_ENTRIES)
        files: dict[str, OutputFile] = {}
        missing = []
        room = total_cap
        for pattern in patterns:
            matched = False
            for name in sorted(_matches(root, pattern.split("/"), "", budget)):
                if name in files:  # named by an earlier pattern too: returned once
                    matched = True
                elif len(files) >= MAX_FILES:
                    matched = True  # it names more files than one result returns
                    break
                elif read := _read(root, name, file_cap, room):
                    matched = True
                    files[name], kept = read
                    room -= kept
            if not matched:
                missing.append(pattern)
        return Collected(list(files.values()), missing, total_cap - room)
    finally:
        os.close(root)


async def attach(
    result: SandboxResult,
    workdir: Path,
    patterns: Sequence[str],
    file_cap: int,
    room: int,
) -> tuple[SandboxResult, int]:
    """``result`` with the output files ``patterns`` name in ``workdir``, within ``room``
    bytes in all; and the bytes they took. Read in a thread: a result may bring back
    megabytes. A thread cannot be stopped, so a cancel waits for it (it ends within its caps)
    before ``CancelledError`` propagates: the caller may then remove ``workdir``."""
    if not patterns:
        return result, 0
    reading = asyncio.ensure_future(asyncio.to_thread(collect, workdir, patterns, file_cap, room))
    try:
        collected = await asyncio.shield(reading)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            await reading
        raise
    update = {"files": collected.files, "missing": collected.missing}
    return result.model_copy(update=update), collected.kept


class _Budget:
    """Directory entries that may still be looked at."""

    def __init__(self, entries: int) -> None:
        self.entries = entries


def _matches(root: int, parts: list[str], prefix: str, budget: _Budget) -> Iterator[str]:
    """Paths (relative to ``root``) that the pattern components ``parts`` match under
    ``prefix``; a component without glob characters is taken as it is, and opened later."""
    head, rest = parts[0], parts[1:]
    if GLOB_CHARACTERS.isdisjoint(head):
        candidates = [head]
    else:
        candidates = [
            name for name in _listing(root, prefix, budget)
            # As glob does: a wildcard does not match a leading dot.
            if fnmatch.fnmatchcase(name, head) and (head.startswith(".") or name[0] != ".")
        ]  # fmt: skip
    for name in candidates:
        path = f"{prefix}{name}"
        if rest:
            yield from _matches(root, rest, f"{path}/", budget)
        else:
            yield path


def _listing(root: int, prefix: str, budget: _Budget) -> list[str]:
    try:
        fd = open_beneath(root, prefix or ".", os.O_RDONLY | os.O_DIRECTORY)
    except OSError as exc:
        _unless_host_trouble(exc)
        return []  # not a directory, or one reached only through a symlink
    names: list[str] = []
    try:
        with os.scandir(fd) as entries:
            for entry in entries:
                if budget.entries <= 0:
                    break
                budget.entries -= 1
                try:
                    entry.name.encode()  # a name that is not UTF-8 cannot be named in JSON
                except UnicodeEncodeError:
                    continue
                names.append(entry.name)
    finally:
        os.close(fd)
    return names


def _read(root: int, name: str, file_cap: int, room: int) -> tuple[OutputFile, int] | None:
    """The regular file ``name`` read up to ``file_cap`` bytes, or the ``room`` left of all
    files' cap, and how many were kept; None for anything else (nothing there, a symlink, a
    directory, a FIFO, a device, a socket)."""
    try:
        fd = open_beneath(root, name, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:
        _unless_host_trouble(exc)
        return None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            return None
        # The head tells the media type even of a file the cap leaves no room for.
        data = _read_up_to(fd, max(min(file_cap, room), HEAD))
    except OSError as exc:
        _unless_host_trouble(exc)
        return None
    finally:
        os.close(fd)
    kept = data[: max(min(file_cap, room), 0)]
    output = OutputFile(
        name=name,
        content=base64.b64encode(kept).decode(),
        size=info.st_size,
        media_type=media_type(name, data[:HEAD]),
        truncated=len(kept) < info.st_size,
    )
    return output, len(kept)


def _unless_host_trouble(exc: OSError) -> None:
    if exc.errno in HOST_ERRORS:
        raise exc


def _read_up_to(fd: int, cap: int) -> bytes:
    chunks = []
    left = cap
    while left > 0:
        chunk = os.read(fd, min(left, 1024 * 1024))
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)
