"""`cellblock up`: placeholder until the supervisor lands."""

from __future__ import annotations

import argparse

from cellblock.config import Config


async def run(config: Config, args: argparse.Namespace) -> int:
    raise NotImplementedError
