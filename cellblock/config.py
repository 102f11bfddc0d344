"""Configuration: one TOML file, overridable by ``CELLBLOCK_*`` environment variables.

The file is ``--config FILE``, else ``<state-dir>/cellblock.toml`` when it exists. A variable
names a key by its path joined with ``__``: ``CELLBLOCK_SLOTS=4``,
``CELLBLOCK_LIMITS__RUN__MAX__CPU=30``. Its value is read as a TOML value (``30``, ``"pure"``,
``[1, 2]``), or as a plain string when it is not one. Unknown keys are errors, so a typo never
silently leaves a default in force.
"""

from __future__ import annotations

import copy
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from cellblock.errors import ConfigError
from cellblock.service.protocol import (
    MAX_TESTS,
    RLIMITS,
    SANDBOX_LIMITS,
    SIZE_LIMITS,
    GradingPolicy,
    InteractivePolicy,
    LimitPolicy,
    StageLimits,
    StagePolicy,
    parse_rlimit,
    parse_seconds,
)

KiB, MiB, GiB = 1024, 1024**2, 1024**3
ENV_PREFIX = "CELLBLOCK_"
# Variables that are not configuration keys: they say where things are.
ENV_NOT_KEYS = frozenset({"CELLBLOCK_URL", "CELLBLOCK_TOKEN", "CELLBLOCK_ADMIN_TOKEN",
                          "CELLBLOCK_STATE_DIR", "CELLBLOCK_CONFIG",
                          "CELLBLOCK_REDIS_URL"})  # fmt: skip

_STAGE_DEFAULTS: dict[str, Any] = {
    "as": "unlimited",  # the cgroup memory cap is the real bound; `as` breaks JVMs and Go
    "core": 0,
    "data": "unlimited",
    "fsize": 64 * MiB,
    "locks": 1024,
    "memlock": 8 * MiB,
    "msgqueue": 800 * KiB,
    "nice": 0,
    "nofile": 1024,
    "nproc": 256,
    "rss": "unlimited",
    "rtprio": 0,
    "rttime": "unlimited",
    "sigpending": 4096,
    "stack": 8 * MiB,
    "memory": 512 * MiB,
    "pids": 256,
    "output": 1 * MiB,
    "disk": 256 * MiB,
}
_STAGE_MAXIMA: dict[str, Any] = {
    "as": "unlimited",
    # A core dump goes to the host's core_pattern, which may run a host program: never allow.
    "core": 0,
    "cpu": 120,
    "data": "unlimited",
    "fsize": 1 * GiB,
    "locks": 65536,
    "memlock": 64 * MiB,
    "msgqueue": 8 * MiB,
    # Above 0 would let a sandboxed program raise its priority over the host's processes.
    "nice": 0,
    "nofile": 65536,
    "nproc": 4096,
    "rss": "unlimited",
    # Real-time scheduling could starve the host: never allow.
    "rtprio": 0,
    "rttime": "unlimited",
    "sigpending": 65536,
    "stack": "unlimited",
    "wall_time": 300,
    "memory": 8 * GiB,
    "pids": 4096,
    "output": 64 * MiB,
    "disk": 4 * GiB,
}

DEFAULTS: dict[str, Any] = {
    "queue_size": 1000,
    "lease_timeout": 15.0,
    "max_attempts": 3,
    "slots": 2,
    "retention": 7 * 24 * 3600.0,
    "max_body_size": 32 * MiB,
    # A nixpkgs checkout or channel path; empty: the bundled offline channel.
    "channel": "",
    "cache": {
        "size_budget": 20 * GiB,  # environments' closures above this are evicted, LRU first
        "grace": 3600.0,  # an environment used this recently is never evicted
        "binary_cache": "",  # builders copy closures here (file:// cache the service serves)
        "substituter": "",  # where executors fetch store paths their host lacks
        # The token executors of other hosts show the service's /nix-cache/ (a client token);
        # better given in the environment, CELLBLOCK_CACHE__SUBSTITUTER_TOKEN, than in a file.
        "substituter_token": "",
    },
    # `root` holds what sandboxes mount (working directories, the init binary, /etc files):
    # nsjail mounts as the sandbox's unprivileged uid, so every folder above it must be
    # searchable by others, which a home or pytest temporary folder is not.
    "sandbox": {
        "base": "host",
        "uid_base": 200000,
        "tmp_size": 64 * MiB,
        "root": "/var/lib/cellblock",
        # The file system image that holds the working directories (sparse: it takes only
        # what they use). Every working directory's disk cap is a share of it, and it is
        # all the host's disk that sandboxes can ever fill.
        "disk_size": 16 * GiB,
    },
    "limits": {
        "compile": {
            "default": {**_STAGE_DEFAULTS, "cpu": 30, "wall_time": 60.0},
            "max": {**_STAGE_MAXIMA},
        },
        "run": {
            "default": {**_STAGE_DEFAULTS, "cpu": 5, "wall_time": 10.0},
            "max": {**_STAGE_MAXIMA},
        },
        "deps": {"wall_time": 600.0, "max_wall_time": 3600.0},
    },
    # Submissions with tests (PROTOCOL.md, "Tests") and output files ("Output files").
    "grading": {
        "max_tests": 200,  # tests in one submission
        "max_tests_wall_time": 2000.0,  # seconds: the sum of one submission's tests' wall_time
        "output_file_size": 4 * MiB,  # bytes of one output file brought back
        "output_total_size": 16 * MiB,  # bytes of all the output files of one result
    },
    # Interactive stdin (PROTOCOL.md, "Interactive standard input").
    "interactive": {
        "max_message": 64 * 1024,  # bytes of one stdin message
        "max_stage_input": 1 * MiB,  # bytes of all the stdin one run stage is sent
    },
    "tokens": {},
}


@dataclass(frozen=True)
class NamedToken:
    name: str
    token: str
    role: Literal["client", "admin"]


@dataclass(frozen=True)
class SandboxConfig:
    base: Literal["host", "pure"]
    uid_base: int
    tmp_size: int
    root: Path
    disk_size: int


@dataclass(frozen=True)
class Config:
    state_dir: Path
    limits: LimitPolicy
    sandbox: SandboxConfig
    queue_size: int
    lease_timeout: float
    max_attempts: int
    slots: int
    retention: float
    max_body_size: int
    channel: str
    cache_size_budget: int
    cache_grace: float
    binary_cache: str
    substituter: str
    substituter_token: str
    tokens: tuple[NamedToken, ...] = field(default=())


def load(
    state_dir: Path,
    config_file: Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> Config:
    """Read the configuration; ``ConfigError`` names the file or variable and the key."""
    environ = os.environ if environ is None else environ
    raw = copy.deepcopy(DEFAULTS)
    path = config_file or (state_dir / "cellblock.toml")
    if config_file is not None or path.exists():
        try:
            data = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"{path}: {exc}") from None
        _merge(raw, data, str(path), "")
    for name, value in sorted(environ.items()):
        if name.startswith(ENV_PREFIX) and name not in ENV_NOT_KEYS:
            keys = name.removeprefix(ENV_PREFIX).lower().split("__")
            nested: dict[str, Any] = {keys[-1]: _env_value(value)}
            for key in reversed(keys[:-1]):
                nested = {key: nested}
            _merge(raw, nested, f"environment variable {name}", "")
    return _build(state_dir, raw)


def _env_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _merge(into: dict[str, Any], data: Mapping[str, Any], source: str, prefix: str) -> None:
    for key, value in data.items():
        path = f"{prefix}{key}"
        if path != "tokens" and key not in into:
            raise ConfigError(f"{source}: unknown key {path!r}")
        if path == "tokens" or isinstance(into[key], dict):
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: {path!r} must be a table")
            if path == "tokens":  # named tokens are free-form: each a table of its own
                for name, table in value.items():
                    if not isinstance(table, dict):
                        raise ConfigError(f"{source}: 'tokens.{name}' must be a table")
                    into[key].setdefault(name, {}).update(table)
            else:
                _merge(into[key], value, source, f"{path}.")
        else:
            into[key] = value


def _build(state_dir: Path, raw: dict[str, Any]) -> Config:
    try:
        limits = raw["limits"]
        policy = LimitPolicy(
            compile=_stage_policy("compile", limits["compile"]),
            run=_stage_policy("run", limits["run"]),
            deps_wall_time=_seconds("limits.deps.wall_time", limits["deps"]["wall_time"]),
            deps_max_wall_time=_seconds(
                "limits.deps.max_wall_time", limits["deps"]["max_wall_time"]
            ),
            grading=_grading_policy(raw["grading"]),
            interactive=_interactive_policy(raw["interactive"]),
        )
        if policy.deps_wall_time > policy.deps_max_wall_time:
            raise ConfigError("limits.deps.wall_time is above limits.deps.max_wall_time")
        sandbox = raw["sandbox"]
        if sandbox["base"] not in ("host", "pure"):
            raise ConfigError(f"sandbox.base is {sandbox['base']!r}; use 'host' or 'pure'")
        tokens = tuple(
            NamedToken(name=name, token=str(t["token"]), role=t.get("role", "client"))
            for name, t in raw["tokens"].items()
        )
        for t in tokens:
            if t.role not in ("client", "admin"):
                raise ConfigError(f"tokens.{t.name}.role is {t.role!r}; use 'client' or 'admin'")
        config = Config(
            state_dir=state_dir,
            limits=policy,
            sandbox=SandboxConfig(
                base=sandbox["base"],
                uid_base=int(sandbox["uid_base"]),
                tmp_size=int(sandbox["tmp_size"]),
                root=Path(sandbox["root"]),
                disk_size=int(sandbox["disk_size"]),
            ),
            queue_size=int(raw["queue_size"]),
            lease_timeout=float(raw["lease_timeout"]),
            max_attempts=int(raw["max_attempts"]),
            slots=int(raw["slots"]),
            retention=float(raw["retention"]),
            max_body_size=int(raw["max_body_size"]),
            channel=str(raw["channel"]),
            cache_size_budget=int(raw["cache"]["size_budget"]),
            cache_grace=float(raw["cache"]["grace"]),
            binary_cache=str(raw["cache"]["binary_cache"]),
            substituter=str(raw["cache"]["substituter"]),
            substituter_token=str(raw["cache"]["substituter_token"]),
            tokens=tokens,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"invalid configuration: {exc}") from None
    if config.slots < 1 or config.max_attempts < 1 or config.queue_size < 1:
        raise ConfigError("slots, max_attempts and queue_size must be at least 1")
    return config


def _stage_policy(stage: str, raw: Mapping[str, Any]) -> StagePolicy:
    defaults = _stage_limits(f"limits.{stage}.default", raw["default"])
    maxima = _stage_limits(f"limits.{stage}.max", raw["max"])
    for name in RLIMITS:
        ceiling = maxima.rlimits[name][1]
        hard = defaults.rlimits[name][1]
        if ceiling is not None and (hard is None or hard > ceiling):
            raise ConfigError(f"limits.{stage}.default.{name} is above limits.{stage}.max.{name}")
    for name in SANDBOX_LIMITS:
        if getattr(defaults, name) > getattr(maxima, name):
            raise ConfigError(f"limits.{stage}.default.{name} is above limits.{stage}.max.{name}")
    return StagePolicy(defaults=defaults, maxima=maxima)


def _stage_limits(where: str, raw: Mapping[str, Any]) -> StageLimits:
    known = {*RLIMITS, *SANDBOX_LIMITS}
    for name in raw:
        if name not in known:
            raise ConfigError(f"unknown limit {where}.{name}")
    missing = known - set(raw)
    if missing:
        raise ConfigError(f"{where} lacks {', '.join(sorted(missing))}")
    rlimits = {}
    for name in RLIMITS:
        try:
            rlimits[name] = parse_rlimit(raw[name])
        except ValueError as exc:
            raise ConfigError(f"{where}.{name}: {exc}") from None
    for name in SIZE_LIMITS:
        if isinstance(raw[name], bool) or not isinstance(raw[name], int) or raw[name] < 1:
            raise ConfigError(f"{where}.{name}: must be a positive integer")
    return StageLimits(
        rlimits=rlimits,
        wall_time=_seconds(f"{where}.wall_time", raw["wall_time"]),
        memory=raw["memory"],
        pids=raw["pids"],
        output=raw["output"],
        disk=raw["disk"],
    )


def _grading_policy(raw: Mapping[str, Any]) -> GradingPolicy:
    for name in ("max_tests", "output_file_size", "output_total_size"):
        value = raw[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"grading.{name}: {value!r} is not a positive integer")
    if raw["max_tests"] > MAX_TESTS:
        raise ConfigError(f"grading.max_tests: {raw['max_tests']} is above {MAX_TESTS}, the most "
                          "tests one submission can hold")  # fmt: skip
    return GradingPolicy(
        max_tests=raw["max_tests"],
        max_tests_wall_time=_seconds("grading.max_tests_wall_time", raw["max_tests_wall_time"]),
        output_file_size=raw["output_file_size"],
        output_total_size=raw["output_total_size"],
    )


def _interactive_policy(raw: Mapping[str, Any]) -> InteractivePolicy:
    for name in ("max_message", "max_stage_input"):
        value = raw[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"interactive.{name}: {value!r} is not a positive integer")
    return InteractivePolicy(max_message=raw["max_message"], max_stage_input=raw["max_stage_input"])


def _seconds(where: str, value: Any) -> float:
    try:
        return parse_seconds(value)
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None
