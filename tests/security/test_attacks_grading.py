"""Attacks on grading, end to end through the real service and a real executor running real
nsjail: output files that are symlinks, FIFOs or floods planted to make the host read a host
file, hang or drown; a test that rewrites the checker or leaves something for the next test.
Each asserts what the host returned, that the verdicts are honest and that it still serves."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path

import pytest
from attackio import Target

pytestmark = pytest.mark.timeout(120)

#: The host's own first line of /etc/passwd: in no answer, whatever the sandbox plants.
HOST_PASSWD = Path("/etc/passwd").read_text().splitlines()[0]


def answer_text(answer: dict[str, object]) -> str:
    """Everything the answer carries, the files' contents decoded."""
    text = json.dumps(answer)
    for result in [answer["stages"]["run"], *(answer["stages"].get("tests") or [])]:  # type: ignore[index]
        for f in result.get("files") or []:
            text += base64.b64decode(f["content"]).decode("latin-1")
    return text


async def test_a_planted_symlink_to_etc_passwd_is_never_followed(target: Target) -> None:
    answer = await target.submit({
        "run": "ln -s /etc/passwd plot.png; mkdir -p d; ln -s /etc d/etc; ln -s /etc etc;"
               " ln -s /proc/self/root/etc/passwd magic.txt; ln -s /proc/1/root root;"
               " ln /etc/passwd hard.txt 2>/dev/null; true",
        "outputs": ["plot.png", "etc/passwd", "etc/*", "d/etc/passwd", "magic.txt",
                    "root/etc/passwd", "hard.txt", "*"],
    })  # fmt: skip
    run = answer["stages"]["run"]
    assert run["status"] == "ok"
    assert run["files"] == []
    assert HOST_PASSWD not in answer_text(answer)
    await target.still_serves()


async def test_a_symlink_swapped_in_during_a_test_is_not_followed_either(
    target: Target,
) -> None:
    """Each test of a submission leaves a different trap behind the same name."""
    answer = await target.submit({
        "run": 'read how; case $how in link) ln -s /etc/passwd out.txt;;'
               ' dir) mkdir -p real; ln -s /etc real2; mv real2 out;;'
               ' file) echo mine > out.txt;; esac',
        "tests": [{"name": n, "stdin": f"{n}\n"} for n in ("link", "dir", "file")],
        "outputs": ["out.txt", "out/passwd"],
    })  # fmt: skip
    tests = {t["name"]: t for t in answer["stages"]["tests"]}
    assert tests["link"]["files"] == [] and tests["dir"]["files"] == []
    assert [base64.b64decode(f["content"]) for f in tests["file"]["files"]] == [b"mine\n"]
    assert HOST_PASSWD not in answer_text(answer)


async def test_a_fifo_named_as_an_output_does_not_hang_the_executor(target: Target) -> None:
    started = time.monotonic()
    answer = await target.submit({
        "run": "mkfifo plot.png; mkfifo data.csv; true",
        "outputs": ["plot.png", "*.csv"],
    }, timeout=30)  # fmt: skip
    assert answer["stages"]["run"]["files"] == []
    assert answer["stages"]["run"]["missing"] == ["plot.png", "*.csv"]
    assert time.monotonic() - started < 20
    await target.still_serves()


async def test_a_flood_of_output_files_stays_within_the_caps(target: Target) -> None:
    answer = await target.submit({
        "run": "for i in $(seq 1 3000); do head -c 20000 /dev/urandom > f$i.bin; done",
        "outputs": ["*.bin"], "limits": {"run": {"wall_time": 60}},
    }, timeout=90)  # fmt: skip
    files = answer["stages"]["run"]["files"]
    assert len(files) <= 1000
    kept = sum(len(base64.b64decode(f["content"])) for f in files)
    assert kept <= 16 * 1024 * 1024
    assert files[-1]["truncated"]
    await target.still_serves()


async def test_a_test_that_rewrites_the_checker_does_not_fool_it(target: Target) -> None:
    """The program replaces check.sh (and plants a fake `cat` on its PATH) before printing a
    wrong answer; the checker runs in a fresh copy of the compiled directory and rejects it."""
    answer = await target.submit({
        "files": [{"name": "check.sh", "content": 'grep -qx 42 "$CB_ACTUAL"'}],
        "run": "echo 'exit 0' > check.sh; mkdir -p bin; printf '#!/bin/sh\\nexit 0\\n' > bin/grep;"
               " chmod +x bin/grep; echo 41",
        "env": {"PATH": "/box/bin:/usr/bin:/bin"},
        "tests": [{"name": "t"}],
        "checker": "bash check.sh",
    })  # fmt: skip
    [test] = answer["stages"]["tests"]
    assert test["verdict"] == "wrong_answer", test
    assert answer["score"]["points"] == 0.0


async def test_what_one_test_leaves_the_next_does_not_see(target: Target) -> None:
    """A test plants a file, a setuid script and a background process for the next; the next
    sees the directory as compile left it, and no process of the first."""
    answer = await target.submit({
        "compile": "echo clean > state",
        "run": 'read n; if [ "$n" = 1 ]; then echo dirty > state; echo x > planted;'
               ' cp /bin/sh sh; chmod u+s sh; (sleep 30 &); echo first;'
               ' else cat state; ls; pgrep sleep || echo no-sleep; fi',
        "tests": [
            {"name": "first", "stdin": "1\n"},
            {"name": "second", "stdin": "2\n", "expected_output": "clean\nstate\nno-sleep\n"},
        ],
    })  # fmt: skip
    tests = {t["name"]: t for t in answer["stages"]["tests"]}
    assert tests["second"]["verdict"] == "passed", tests["second"]
    await target.settled()


async def test_a_socket_or_a_path_too_long_does_not_fail_the_submission(target: Target) -> None:
    """A UNIX socket named as an output makes openat2 fail with ENXIO, a path past PATH_MAX
    with ENAMETOOLONG: either would otherwise turn a student's run into a system error."""
    answer = await target.submit({
        "run": "python3 -c \"import socket; socket.socket(socket.AF_UNIX).bind('x.png')\";"
               " d=$(printf 'd%.0s' $(seq 250)); for i in $(seq 20); do mkdir $d; cd $d; done;"
               " echo deep > f.txt; echo done",
        "outputs": ["x.png", "*.png", "/".join(["*"] * 21)],
        "tests": [{"name": "t", "expected_output": "done\n"}],
    })  # fmt: skip
    assert answer["status"] == "finished"
    [test] = answer["stages"]["tests"]
    assert test["verdict"] == "passed", test
    assert test["files"] == [] and len(test["missing"]) == 3
    await target.still_serves()


async def test_nothing_a_test_leaves_reaches_any_later_test(target: Target) -> None:
    """Tests take turns in a few series of jails, each made afresh from the same loaded nsjail:
    whatever the first test leaves in its jail (files in /box, /tmp and /dev/shm, a SysV
    shared memory segment, a listening abstract socket, a process that left its session), no
    later test, in whichever series it runs, sees it."""
    plant = (
        "echo dirty > state; echo x > /tmp/planted; echo x > /dev/shm/planted;"
        " ipcmk -M 4096 >/dev/null;"
        ' setsid python3 -c "import socket, time; s = socket.socket(socket.AF_UNIX);'
        " s.bind('\\0cellblock-planted'); s.listen(); time.sleep(30)\" >/dev/null 2>&1 &"
        " sleep 0.3; echo planted"
    )
    look = (
        "cat state; ls /tmp /dev/shm; ipcs -m | grep -c '^0x' || true;"
        ' python3 -c "import socket; s = socket.socket(socket.AF_UNIX)\n'
        "try: s.connect('\\0cellblock-planted'); print('reached')\n"
        "except OSError: print('alone')\";"
        " ps -e -o comm= | grep -c python3 || true"
    )
    answer = await target.submit({
        "compile": "echo clean > state",
        "run": f'read n; if [ "$n" = 0 ]; then {plant}; else {look}; fi',
        "tests": [{"name": "plant", "stdin": "0\n", "expected_output": "planted\n"}]
        + [{"name": f"look{i}", "stdin": f"{i}\n", "expected_output": "clean\n/dev/shm:\n\n"
            "/tmp:\n0\nalone\n0\n"} for i in range(1, 6)],
    })  # fmt: skip
    tests = answer["stages"]["tests"]
    seen = [(t["stdout"], t["stderr"]) for t in tests]
    assert [t["verdict"] for t in tests] == ["passed"] * 6, seen
    await target.settled()


async def test_a_test_holds_only_its_own_three_streams(target: Target) -> None:
    """The jail's control socket outlives a test's init (the next test's request comes on it),
    and each test's status socket is init's: a program that held either could read another
    test's hidden input or forge its report. It holds neither: only its stdin, stdout and
    stderr, which are pipes, and it cannot open init's descriptors."""
    answer = await target.submit({
        "run": "python3 -c \"import os\n"
               "fds = sorted(int(f) for f in os.listdir('/proc/self/fd'))\n"
               "print([f for f in fds if f > 2 and os.path.exists(f'/proc/self/fd/{f}')])\n"
               "print([os.readlink(f'/proc/self/fd/{f}').split(':')[0] for f in (0, 1, 2)])\n"
               "try: print(os.listdir('/proc/1/fd'))\n"
               "except OSError as e: print(e.strerror)\"",
        "tests": [{"name": f"t{i}", "expected_output": "[]\n['pipe', 'pipe', 'pipe']\n"
                   "Permission denied\n"} for i in range(3)],
    })  # fmt: skip
    assert [t["verdict"] for t in answer["stages"]["tests"]] == ["passed"] * 3, answer
    await target.still_serves()


@pytest.mark.parametrize("way", ["copy", "snapshot"])
async def test_traps_the_compile_stage_plants_reach_each_test_as_what_they_are(
    target: Target, way: str
) -> None:
    """Each test's directory is a copy of the compiled one (a small tree), or a snapshot (a
    tree with a FIFO, a hard link or a huge sparse file, which a copy would not keep). The
    host makes the copy, so the compile stage plants what would make it read a host file or
    write without end: symlinks out (absolute, escaping by ``..``, to a directory) and holes.
    Every test sees them as what they are, links never followed, and nothing hangs."""
    plant = (
        "echo clean > state; ln -s /etc/passwd abs; ln -s ../../../../../../../etc/hostname up;"
        " ln -s /etc etcdir; mkdir sub; ln -s ../../../../../../.. sub/root; truncate -s 256K holes"
    )
    if way == "snapshot":
        plant += "; mkfifo fifo; ln state hard; truncate -s 8M huge"
    look = (
        'for f in abs up etcdir sub/root; do test -L $f && echo "$f -> $(readlink $f)"; done;'
        " stat -c %s holes; cat state; echo dirty > state"
    )
    answer = await target.submit({
        "compile": plant,
        "run": look,
        "tests": [{"name": f"t{i}", "expected_output":
                   "abs -> /etc/passwd\nup -> ../../../../../../../etc/hostname\n"
                   "etcdir -> /etc\nsub/root -> ../../../../../../..\n262144\nclean\n"}
                  for i in range(4)],
    })  # fmt: skip
    tests = answer["stages"]["tests"]
    assert [t["verdict"] for t in tests] == ["passed"] * 4, answer["stages"]
    assert Path("/etc/hostname").read_text().strip() not in answer_text(answer)
    await target.settled()
