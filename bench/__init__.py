"""pytest-benchmark harness: `pytest --benchmark-only` from the repository root."""
