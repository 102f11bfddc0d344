"""Maps the repository's part folders onto the ``cellblock.*`` packages (see shared/DESIGN.md)."""

from setuptools import setup

PARTS = {
    "cellblock": "cellblock",
    "cellblock.service": "service",
    "cellblock.executor": "executor",
    "cellblock.cachebuilder": "cachebuilder",
    "cellblock.kernel": "kernel",
    "cellblock.server_ext": "server_ext",
}

setup(
    packages=list(PARTS),
    # `pip install` itself installs the kernelspec and enables the server extension.
    data_files=[
        ("share/jupyter/kernels/cellblock", ["kernel/kernelspec/kernel.json"]),
        ("etc/jupyter/jupyter_server_config.d", ["server_ext/jupyter-config/cellblock.json"]),
    ],
    package_dir=PARTS,
    package_data={
        "cellblock.executor": ["*.c"],
        "cellblock.kernel": ["kernelspec/kernel.json"],
        "cellblock.server_ext": ["templates/*.html"],
        "cellblock.cachebuilder": [
            "channel/*.nix",
            "channel/*.sh",
            "channel/builders/*",
            "channel/shell-setup/*",
        ],
    },
)
