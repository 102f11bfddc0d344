"""Maps the repository's part folders onto the ``cellblock.*`` packages (see shared/DESIGN.md)."""

from setuptools import setup

PARTS = {
    "cellblock": "cellblock",
    "cellblock.service": "service",
    "cellblock.executor": "executor",
    "cellblock.cachebuilder": "cachebuilder",
}

setup(
    packages=list(PARTS),
    package_dir=PARTS,
    package_data={
        "cellblock.executor": ["*.c"],
        "cellblock.cachebuilder": ["channel/*.nix", "channel/*.sh", "channel/builders/*",
                                   "channel/shell-setup/*"],
    },
)
