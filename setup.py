"""What pyproject.toml cannot say statically: the subpackages of the part folders that its
``[tool.setuptools.package-dir]`` maps onto ``cellblock.*``, and the data files (the kernelspec,
the server extension's enabling config, the built JupyterLab extension) that a wheel installs
under the environment's prefix."""

import tomllib
from pathlib import Path

from setuptools import find_packages, setup

PYPROJECT = tomllib.loads(Path(__file__).with_name("pyproject.toml").read_text())
PARTS: dict[str, str] = PYPROJECT["tool"]["setuptools"]["package-dir"]

# Every package of every part folder, so that a new subpackage (service/client/) is in the
# wheel, and in the link tree of the package that `make` lays out, without being listed.
packages = [
    package
    for name, folder in PARTS.items()
    for package in (name, *(f"{name}.{sub}" for sub in find_packages(folder)))
]

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
    packages=packages,
    # `pip install` itself installs the kernelspec and enables the server extension.
    data_files=[
        ("share/jupyter/kernels/cellblock", ["kernel/kernelspec/kernel.json"]),
        ("etc/jupyter/jupyter_server_config.d", ["server_ext/jupyter-config/cellblock.json"]),
        *labextension_files,
    ],
)
