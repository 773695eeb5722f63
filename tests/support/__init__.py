"""Helpers only the test suite uses (importable as `support` through pytest's pythonpath); what the
benchmarks share with the tests lives in `devkit/`."""
