"""Escapes through the host's own file handling, end to end through the real service and a
real executor running real nsjail: symlinks and FIFOs planted where the host later writes,
reads or deletes (Judge0's 2024 escapes), hostile file names in the request, and many
thousands of files. Each test asserts that nothing outside the submission's working directory
changes on the host, that the submission gets an honest status, and that the service still
serves afterwards."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from attackio import OpenTarget, Target

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    """A host folder a submission must never touch: a file, and a folder holding a file."""
    folder = tmp_path / "victim"
    (folder / "keep").mkdir(parents=True)
    (folder / "precious").write_text("precious\n")
    (folder / "keep" / "inner").write_text("inner\n")
    return folder


def snapshot(folder: Path) -> dict[str, tuple[int, bytes]]:
    """Every entry under ``folder`` with its mode and content, to compare before and after."""
    found = {}
    for path in sorted(folder.rglob("*")):
        content = path.read_bytes() if path.is_file() else b""
        found[str(path.relative_to(folder))] = (path.lstat().st_mode, content)
    return found


async def ready_workdir(target: Target) -> Path:
    """The working directory the slot keeps ready: the next submission's."""
    [workdir] = await target.until(target.workdirs, "the slot's next working directory")
    return workdir


async def test_symlinks_to_host_paths_do_not_make_the_host_write_delete_or_truncate(
    open_target: OpenTarget, victim: Path, sandbox_root: Path
) -> None:
    """The compile stage replaces an uploaded file by a symlink to a host file and plants
    symlinks to a host file, a host folder, the sandbox root, the folder of every slot's
    working directory and /; the run stage writes and truncates through them. Inside the jail
    the host paths do not exist; outside, the host removes the working directory without
    following any of them: the victim, the sandbox root's files and the other working
    directories (the executor's other slot keeps one ready) are untouched."""
    target = await open_target(slots=2)
    before, etc = snapshot(victim), snapshot(sandbox_root / "etc")
    ready = set(await target.until(lambda: len(target.workdirs()) == 2 and target.workdirs(),
                                   "both slots' next working directories"))  # fmt: skip
    links = {
        "main.c": victim / "precious",  # named like the uploaded file it replaces
        "file": victim / "precious",
        "folder": victim,
        "keep": victim / "keep",
        "root": Path("/"),
        "sandbox": sandbox_root,
        "workdirs": target.work_root,
    }
    plant = "rm main.c && " + " && ".join(f"ln -s {dest} {name}" for name, dest in links.items())
    attack = (
        "for f in main.c file folder/precious keep/inner; do echo pwned > $f 2>/dev/null"
        " && echo wrote $f; : > $f 2>/dev/null && echo truncated $f; done; ls workdirs/; true"
    )
    answer = await target.submit(
        {"files": [{"name": "main.c", "content": "int x;\n"}], "compile": plant, "run": attack}
    )
    compiled, ran = answer["stages"]["compile"], answer["stages"]["run"]
    assert compiled["status"] == "ok", compiled
    assert (ran["status"], ran["stdout"]) == ("ok", ""), ran  # no host path exists inside
    # The submission's own working directory is removed, the other slot's stays.
    await target.until(
        lambda: sum(p.exists() for p in ready) == 1, "the working directory to be removed"
    )
    assert snapshot(victim) == before
    assert snapshot(sandbox_root / "etc") == etc
    await target.still_serves()


async def test_fifos_and_special_files_planted_do_not_hang_the_executor(
    target: Target, victim: Path
) -> None:
    """FIFOs planted in compile and run, one in place of an uploaded file, a unix socket
    file, and a device node attempt; the run stage then fails, so that the host inspects the
    working directory after it (it asks whether the disk cap stopped it). Nothing on the host
    opens a FIFO: the submission ends at once with the run stage's honest ``failed``, the
    device node is refused, and the slot serves the next submission."""
    workdir = await ready_workdir(target)
    plant = "rm data.txt && mkfifo data.txt fifo .hidden-fifo && mkdir d && mkfifo d/fifo"
    attack = (
        "mkfifo late; python3 -c 'import socket; socket.socket(socket.AF_UNIX).bind(\"sock\")';"
        " mknod node c 1 3 2>/dev/null || echo no-mknod; ln -s fifo link; exit 3"
    )
    started = time.monotonic()
    answer = await target.submit(
        {"files": [{"name": "data.txt", "content": "x"}], "compile": plant, "run": attack}
    )
    ran = answer["stages"]["run"]
    assert answer["stages"]["compile"]["status"] == "ok"
    assert (ran["status"], ran["exit_code"], ran["stdout"]) == ("failed", 3, "no-mknod\n"), ran
    assert time.monotonic() - started < 10
    await target.until(lambda: not workdir.exists(), "the working directory to be removed")
    await target.still_serves()


async def test_symlinks_left_in_a_slot_do_not_redirect_the_next_submissions_files(
    target: Target, victim: Path
) -> None:
    """A submission plants symlinks (to a host file and a host folder) under the names the
    next submission in the same slot uploads, in its working directory and in /tmp. The next
    submission's files are written into a fresh working directory, as regular files with
    their own content; the victim is untouched."""
    before = snapshot(victim)
    plant = (
        f"ln -s {victim / 'precious'} main.c && mkdir data && "
        f"ln -s {victim / 'precious'} data/input.txt && ln -s {victim} folder && "
        f"ln -s {victim / 'precious'} /tmp/main.c && ls"
    )
    first = await target.run(plant)
    assert first["stdout"].split() == ["data", "folder", "main.c"], first
    files = [
        {"name": "main.c", "content": "one\n"},
        {"name": "data/input.txt", "content": "two\n"},
        {"name": "folder/precious", "content": "three\n"},
    ]
    check = "for f in main.c data/input.txt folder/precious; do test -L $f && echo link; done;"
    second = await target.run(f"{check} cat main.c data/input.txt folder/precious", files=files)
    assert (second["status"], second["stdout"]) == ("ok", "one\ntwo\nthree\n"), second
    assert snapshot(victim) == before


REFUSED_NAMES = [
    "../escape",
    "a/../../escape",
    "..",
    "/etc/passwd",
    "/tmp/escape",
    "",
    "./x",
    "a//b",
    "a/",
    "x" * 256,  # a component over NAME_MAX
    "a/" * 600 + "b",  # over 1024 bytes in all
    "nul\x00byte",
]


async def test_dotdot_absolute_empty_and_overlong_names_are_refused_with_422(
    target: Target, tmp_path: Path
) -> None:
    """Each hostile file name is refused with 422, the protocol's error body naming
    ``files[1].name``, and nothing is queued or written: no submission exists afterwards
    and nothing appears on the host where the name points."""
    for name in REFUSED_NAMES:
        request = {
            "files": [{"name": "ok.txt", "content": "x"}, {"name": name, "content": "pwned"}],
            "run": "true",
        }
        response = await target.rest.request("POST", "/api/v1/submissions?wait=true", request)
        assert response.code == 422, (name, response.code, response.body)
        error: dict[str, Any] = json.loads(response.body)["error"]
        assert error["code"] and error["message"], error
        assert [d["field"] for d in error["details"]] == ["files[1].name"], (name, error)
    listed = await target.rest.call("GET", "/api/v1/submissions")
    assert listed["submissions"] == []
    assert not Path("/tmp/escape").exists() and not (tmp_path.parent / "escape").exists()
    await target.still_serves()


async def test_long_deep_and_odd_file_names_land_exactly_where_they_say(target: Target) -> None:
    """The longest names the protocol allows (a 255-byte component, 1024 bytes in all, 512
    folders deep) and names a shell would misread (a newline, a leading dash, spaces, quotes,
    ``$(...)``, globs, non-ASCII) are written as given, inside the working directory, and no
    shell ever interprets them."""
    names = [
        "n" * 255,
        ("d" * 200 + "/") * 5 + "f" * 19,
        "a/" * 511 + "b",
        "new\nline",
        "-rf",
        "with space",
        "quote'\"",
        "$(touch pwned)",
        "*",
        "ünïcødé",
        ".hidden",
    ]
    assert len(names[1].encode()) == 1024 and len(names[2].encode()) == 1023
    files = [{"name": name, "content": f"{i}\n"} for i, name in enumerate(names)]
    lister = (
        "import json, os\nfound = {}\nfor top, _, leaves in os.walk('.'):\n"
        "    for leaf in leaves:\n        path = os.path.join(top, leaf)[2:]\n"
        "        found[path] = open(path).read()\nprint(json.dumps(found))\n"
    )
    files.append({"name": "list.py", "content": lister})
    ran = await target.run("python3 list.py", files=files)
    assert ran["status"] == "ok", ran
    found = json.loads(ran["stdout"])
    assert found.pop("list.py") == lister
    assert found == {name: f"{i}\n" for i, name in enumerate(names)}
    await target.still_serves()


async def test_twenty_thousand_files_are_cleaned_up_quickly(target: Target) -> None:
    """The program creates 20000 small files in 100 folders. The stage ends ``ok``, the host
    removes the working directory within seconds, and the slot serves the next submission
    at once."""
    workdir = await ready_workdir(target)
    make = (
        "import os\nfor d in range(100):\n    os.mkdir(f'd{d}')\n    for f in range(200):\n"
        "        with open(f'd{d}/f{f}', 'w') as out:\n            out.write('x')\n"
        "print(sum(len(files) for _, _, files in os.walk('.')))\n"
    )
    ran = await target.run("python3 make.py", files=[{"name": "make.py", "content": make}])
    assert (ran["status"], ran["stdout"]) == ("ok", "20001\n"), ran
    removed = time.monotonic()
    await target.until(lambda: not workdir.exists(), "the working directory to be removed", 10)
    assert time.monotonic() - removed < 5
    served = time.monotonic()
    await target.still_serves()
    assert time.monotonic() - served < 5
