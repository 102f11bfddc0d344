"""Maps the repository's part folders onto the ``cellblock.*`` packages (see shared/DESIGN.md)."""

from pathlib import Path

from setuptools import setup

PARTS = {
    "cellblock": "cellblock",
    "cellblock.service": "service",
    "cellblock.executor": "executor",
    "cellblock.cachebuilder": "cachebuilder",
    "cellblock.kernel": "kernel",
    "cellblock.server_ext": "server_ext",
}

# The JupyterLab frontend extension, as `make` prebuilds it (see the Makefile), folder by
# folder. Before that build there is nothing to ship: the wheel goes without it, not failing.
LABEXTENSION = Path("server_ext/labextension/build")
LABEXTENSION_TARGET = Path("share/jupyter/labextensions/cellblock-launcher")
labextension_folders = [LABEXTENSION, *LABEXTENSION.rglob("*")] if LABEXTENSION.is_dir() else []
labextension_files = [
    (
        str(LABEXTENSION_TARGET / folder.relative_to(LABEXTENSION)),
        sorted(str(f) for f in folder.iterdir() if f.is_file()),
    )
    for folder in sorted(labextension_folders)
    if folder.is_dir()
]

setup(
    packages=list(PARTS),
    # `pip install` itself installs the kernelspec and enables the server extension.
    data_files=[
        ("share/jupyter/kernels/cellblock", ["kernel/kernelspec/kernel.json"]),
        ("etc/jupyter/jupyter_server_config.d", ["server_ext/jupyter-config/cellblock.json"]),
        *labextension_files,
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
    # The built frontend extension goes to share/jupyter only (data_files), not into the package.
    exclude_package_data={"cellblock.server_ext": ["labextension/*"]},
)
