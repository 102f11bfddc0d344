"""Tokens and roles.

A token belongs to a named principal with a role, ``client`` or ``admin``. The principal's name
owns the submissions its token creates. Tokens come from, in order: the configuration's
``[tokens.NAME]`` tables, ``CELLBLOCK_TOKEN`` / ``CELLBLOCK_ADMIN_TOKEN``, and the files
``<state-dir>/token`` / ``<state-dir>/admin-token`` that ``cellblock up`` writes.
"""

from __future__ import annotations

import hmac
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cellblock.config import Config
from cellblock.errors import ConfigError

Role = Literal["client", "admin"]


@dataclass(frozen=True)
class Principal:
    name: str
    role: Role

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


class Tokens:
    """Looks tokens up in constant time per candidate, so timing tells nothing about them."""

    def __init__(self, tokens: Mapping[str, Principal]) -> None:
        if not tokens:
            raise ConfigError("no tokens are configured: nobody could use the API")
        self._tokens = dict(tokens)

    def authenticate(self, token: str | None) -> Principal | None:
        if not token:
            return None
        found = None
        for candidate, principal in self._tokens.items():
            if hmac.compare_digest(candidate.encode(), token.encode()):
                found = principal
        return found


def token_files(state_dir: Path) -> dict[Role, Path]:
    return {"client": state_dir / "token", "admin": state_dir / "admin-token"}


def ensure_token_files(
    state_dir: Path, client: str | None = None, admin: str | None = None
) -> dict[Role, str]:
    """Write the default tokens (given, or else newly generated), mode 0600, and return them."""
    given: dict[Role, str | None] = {"client": client, "admin": admin}
    tokens: dict[Role, str] = {}
    for role, path in token_files(state_dir).items():
        value = given[role]
        if value is None and path.exists():
            value = path.read_text().strip()
        value = value or secrets.token_urlsafe(32)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(value + "\n")
        os.chmod(path, 0o600)
        tokens[role] = value
    return tokens


def load_tokens(config: Config, environ: Mapping[str, str] | None = None) -> Tokens:
    environ = os.environ if environ is None else environ
    found: dict[str, Principal] = {}
    for named in config.tokens:
        found[named.token] = Principal(named.name, named.role)
    for role, variable in (("client", "CELLBLOCK_TOKEN"), ("admin", "CELLBLOCK_ADMIN_TOKEN")):
        if value := environ.get(variable):
            found.setdefault(value, Principal(role, role))  # type: ignore[arg-type]
    for role, path in token_files(config.state_dir).items():
        if path.exists() and (value := path.read_text().strip()):
            found.setdefault(value, Principal(role, role))
    return Tokens(found)
