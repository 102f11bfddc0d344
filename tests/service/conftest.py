"""Service tests use the shared fixtures of tests/conftest.py (real redis, service, executors)."""
