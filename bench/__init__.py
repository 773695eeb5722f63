"""Benchmarks and the shapes study (`python -m bench.<name>`); see docs/design.md section 6."""
