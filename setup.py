"""Maps the repository's part folders onto the ``cellblock.*`` packages (see shared/DESIGN.md)."""

from setuptools import setup

PARTS = {
    "cellblock": "cellblock",
    "cellblock.service": "service",
    "cellblock.executor": "executor",
    "cellblock.cachebuilder": "cachebuilder",
    "cellblock.kernel": "kernel",
}

setup(
    packages=list(PARTS),
    # `pip install` itself installs the kernelspec, into <prefix>/share/jupyter/kernels.
    data_files=[("share/jupyter/kernels/cellblock", ["kernel/kernelspec/kernel.json"])],
    package_dir=PARTS,
    package_data={
        "cellblock.executor": ["*.c"],
        "cellblock.kernel": ["kernelspec/kernel.json"],
        "cellblock.cachebuilder": ["channel/*.nix", "channel/*.sh", "channel/builders/*",
                                   "channel/shell-setup/*"],
    },
)
