"""pytest plugin: collect the repository root as a plain folder, not as a Python package.

The repo root holds the pack's `__init__.py` (ComfyUI's entry point). pytest would otherwise
treat the root as a package and import that file during setup, with whatever folder name the
checkout has; the pack is only meant to be imported by ComfyUI. Loaded via `addopts = -p ...`.
"""
import pytest


@pytest.hookimpl(tryfirst=True)
def pytest_collect_directory(path, parent):
    if path == parent.config.rootpath:
        return pytest.Dir.from_parent(parent, path=path)
    return None
