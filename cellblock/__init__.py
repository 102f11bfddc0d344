"""Cellblock: sandboxed code execution for notebooks, classrooms and scripts."""

import pkgutil

# The package's parts live in folders of their own (pyproject.toml's package-dir). Where this
# folder comes first on the path (`python -m cellblock` in the repository root), the rest is
# where the installed package is: a strict editable install's link tree.
__path__ = pkgutil.extend_path(__path__, __name__)

__version__ = "0.1.0"
