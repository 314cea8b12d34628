"""Benchmarks: step times and costs measured side by side in one run (``nox -s benchmark``)."""
