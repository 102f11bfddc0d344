"""The seccomp policy as data (executor/seccomp.py); the calls it refuses are tried for real
in tests/security/test_attacks_*.py."""

from __future__ import annotations

import re
from pathlib import Path

from cellblock.executor import seccomp

SECURITY_MD = Path(__file__).parents[2] / "SECURITY.md"


def test_the_policy_refuses_each_rule_then_allows_the_rest() -> None:
    policy = seccomp.policy()
    assert policy.endswith(" DEFAULT ALLOW")
    assert policy.count("ERRNO(") == len(seccomp.RULES)
    for name in ("unshare", "clone3", "io_uring_setup", "SYSCALL[457]", "umount"):
        assert name in policy
    assert "statmount" not in policy and "umount2" not in policy  # unknown to kafel


def test_int_arguments_are_compared_on_their_lower_half_only() -> None:
    """The kernel reads an int argument from the lower half of its register: every comparison
    of one masks the upper half, so garbage there cannot slip past a rule."""
    bodies = [call.split("{", 1)[1] for rule in seccomp.RULES for call in rule.calls if "{" in call]
    for arg in ("persona", "domain", "protocol"):
        uses = sum(len(re.findall(rf"\b{arg}\b", body)) for body in bodies)
        masked = sum(body.count(f"({arg} & 0xffffffff)") for body in bodies)
        assert uses == masked > 0, arg


def test_namespace_flags_are_dockers_mask() -> None:
    flags = {"NEWNS": 0x20000, "NEWCGROUP": 0x2000000, "NEWUTS": 0x4000000,
             "NEWIPC": 0x8000000, "NEWUSER": 0x10000000, "NEWPID": 0x20000000,
             "NEWNET": 0x40000000}  # fmt: skip
    assert sum(flags.values()) == seccomp.CLONE_NAMESPACE_FLAGS == 0x7E020000


def test_security_md_explains_every_refused_call() -> None:
    text = SECURITY_MD.read_text()
    missing = [name for name in seccomp.refused_calls() if f"`{name}`" not in text]
    assert not missing, f"SECURITY.md does not list {missing}"
