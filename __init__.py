"""ComfyUI entry point of the LLM Diff Adapter pack.

ComfyUI imports this folder as a package from `custom_nodes/` and calls `comfy_entrypoint` (the V3
mechanism; we deliberately export no NODE_CLASS_MAPPINGS, whose presence would make ComfyUI
ignore the entry point). Importing registers the model folders `models/LLM` and
`models/llm_adapters`; the nodes import transformers and the adapter library on first use only.

Outside ComfyUI (pytest collects this repository root as a package, the trainer imports
`adapter` from here) there is no `comfy_api` to import, and this file does nothing.
"""
import importlib.util

if importlib.util.find_spec("comfy_api") is not None and importlib.util.find_spec("folder_paths") is not None:
    from .nodes.entrypoint import comfy_entrypoint  # noqa: F401
    from .nodes.paths import register_model_folders

    register_model_folders()

WEB_DIRECTORY = "./web"  # a small frontend extension: folds advanced inputs away, fixes Enhance prompt's seed
