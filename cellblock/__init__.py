"""Cellblock: sandboxed code execution for notebooks, classrooms and scripts."""

__version__ = "0.1.0"
