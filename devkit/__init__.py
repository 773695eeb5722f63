"""What the tests and the benchmarks build and run, shared by both (`from devkit.tiny_models import ...`).

Tiny random LLMs with real tokenizers, tiny and full-size random Stable Diffusion weights, a random
full-size Qwen2.5-3B, a real ComfyUI server driven over HTTP, the pack imported in-process as ComfyUI
imports it, and the trainer run as a subprocess. Everything is built locally, once per machine, into
`cache.cache_dir()`. Neither the pack nor the trainer imports this package; `tests/support/` holds what
only the test suite uses.
"""
