"""The pack imported in-process as ComfyUI imports it, with ComfyUI's own modules in CPU mode.

The node tests call the nodes' `execute` directly, with ComfyUI's own folder_paths, ModelPatcher
and model management, and the pack imported as a package whose `nodes` subpackage imports
`..adapter` relatively (as ComfyUI loads it from custom_nodes/). `bench.comfy_llm_paths` uses the
same route.

    comfy_importable() -> Path     ComfyUI's folder, importable, in CPU mode
    load_pack() -> module          the repository root as the package `llm_diff_pack` (once per process)
    node_classes() -> dict         node id -> class, through the V3 entry point
    pack_module(name) -> module    e.g. "adapter" or "nodes.encode", as the nodes see it
"""
from __future__ import annotations

import contextlib
import importlib.machinery
import importlib.util
import sys
import types
from pathlib import Path

from devkit.cache import vendored_comfyui_source

PACK_NAME = "llm_diff_pack"  # what ComfyUI would call it is the folder name; any package name works
REPO_ROOT = Path(__file__).resolve().parents[1]


def comfy_importable() -> Path:
    """Put the vendored ComfyUI on sys.path in CPU mode (as `main.py --cpu` would), import what the
    nodes use, and return its folder."""
    source = vendored_comfyui_source()
    if str(source) not in sys.path:
        sys.path.insert(0, str(source))
    import comfy.cli_args

    comfy.cli_args.args.cpu = True  # before comfy.model_management is imported: it probes CUDA at import
    with _torchvision_stub_if_missing():
        import comfy.model_management  # noqa: F401
        import comfy.model_patcher  # noqa: F401
        import comfy.sd  # noqa: F401
        import comfy.utils  # noqa: F401
        import folder_paths  # noqa: F401
        from comfy_api import latest  # noqa: F401
    return source


@contextlib.contextmanager
def _torchvision_stub_if_missing():
    """comfy.model_base imports torchvision at module level, for Cosmos and Cascade models only. PyPI's
    torchvision wheel is a CUDA build that cannot load beside the CPU torch here, so while ComfyUI's
    modules import, an empty stand-in answers; it is removed afterwards so that transformers (which
    probes for torchvision with find_spec) still sees none."""
    if importlib.util.find_spec("torchvision") is not None:
        yield
        return
    import transformers  # noqa: F401  # decides "no torchvision" now, before the stand-in exists

    stub = types.ModuleType("torchvision")
    stub.__spec__ = importlib.machinery.ModuleSpec("torchvision", None, is_package=True)
    stub.__path__ = []
    stub.transforms = types.ModuleType("torchvision.transforms")
    sys.modules.update({"torchvision": stub, "torchvision.transforms": stub.transforms})
    try:
        yield
    finally:
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]


def load_pack():
    """Import the repository root as the package ComfyUI would load from custom_nodes/ (once per process)."""
    if PACK_NAME in sys.modules:
        return sys.modules[PACK_NAME]
    comfy_importable()
    spec = importlib.util.spec_from_file_location(PACK_NAME, REPO_ROOT / "__init__.py", submodule_search_locations=[str(REPO_ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACK_NAME] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(PACK_NAME, None)
        raise
    return module


def node_classes() -> dict:
    """node id -> class, through the V3 entry point exactly as ComfyUI's loader calls it."""
    import asyncio

    pack = load_pack()
    extension = asyncio.run(pack.comfy_entrypoint())
    return {cls.GET_SCHEMA().node_id: cls for cls in asyncio.run(extension.get_node_list())}


def pack_module(name: str):
    """A submodule of the pack as the nodes see it, e.g. "adapter" (the relative-import copy) or "nodes.encode"."""
    load_pack()
    return importlib.import_module(f"{PACK_NAME}.{name}")
