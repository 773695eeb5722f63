"""Benchmarks and the shapes study (`python -m bench.<name>`); see DESIGN.md section 6."""
