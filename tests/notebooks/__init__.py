"""A package, so that this folder's test_notebooks.py is not taken for tests/kernel's."""
