"""Single-file LLMs in models/text_encoders: which files to offer in Load LLM, and how to load one.

ComfyUI users keep the LLM text encoders of recent image models as single safetensors files in
`models/text_encoders` (folder_paths "text_encoders", `extra_model_paths.yaml` honoured). ComfyUI
recognises a file by its weight names alone (`comfy.sd.detect_te_model`) and builds it with a fixed
full-size config; we ask that same function, over the safetensors header only (names and shapes, a
few kB; nothing is loaded), and list the files it recognises as a decoder-only LLM we support.
Headers are cached per (path, size, mtime), so refreshing the node list re-reads only changed files.

In the `llm_name` dropdown a file appears as "text_encoders/<name as CLIPLoader lists it>"; folders
keep their plain names, so workflows saved before single files existed load unchanged. Should a
models/LLM folder be called "text_encoders/<x>" itself (a grouping folder), the folder wins.

A file is loaded with `comfy.sd.load_clip`, exactly as CLIPLoader loads it (its precision, fp8 and
scaled-fp8 formats included), and wrapped like LLM from CLIP loader (nodes/comfy_llm.py).
"""
from __future__ import annotations

import json
import logging
import os
from types import SimpleNamespace

import folder_paths

from .paths import LLM_FOLDER, resolve_in_folder

log = logging.getLogger(__name__)

TEXT_ENCODERS = "text_encoders"
SINGLE_FILE_PREFIX = "text_encoders/"
SAFETENSORS_EXTENSIONS = (".safetensors", ".sft")  # never pickles
# comfy.sd.TEModel names of the decoder-only LLMs the pack supports (Mistral 3 / Flux 2 is not: its
# tokenizer is a tekken file that has no transformers fast tokenizer).
SUPPORTED_TE_MODELS = frozenset({"QWEN25_3B", "QWEN25_7B", "QWEN3_4B", "LLAMA3_8", "GEMMA_2_2B", "GEMMA_3_4B"})
MAX_HEADER_BYTES = 16 * 1024 * 1024  # a 70B model's header is ~100 kB; anything far larger is not a safetensors header

_detected: dict[tuple[str, int, int], str | None] = {}


def detect_llm(path: str) -> str | None:
    """comfy.sd.TEModel name of a safetensors file from its header (None: unreadable or not a model ComfyUI knows)."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    key = (path, stat.st_size, stat.st_mtime_ns)
    if key not in _detected:
        _detected[key] = _detect_from_header(path)
    return _detected[key]


def _detect_from_header(path: str) -> str | None:
    import comfy.sd
    import comfy.utils
    import torch

    try:
        header = comfy.utils.safetensors_header(path, max_size=MAX_HEADER_BYTES)
        entries = json.loads(header) if header else None
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    if not isinstance(entries, dict):
        return None
    # detect_te_model reads only `key in sd` and `sd[key].shape`.
    shapes = {name: SimpleNamespace(shape=torch.Size(entry["shape"])) for name, entry in entries.items()
              if isinstance(entry, dict) and "shape" in entry}
    kind = comfy.sd.detect_te_model(shapes)
    return None if kind is None else kind.name


def list_llm_files() -> list[str]:
    """"text_encoders/<file>" for every safetensors file there that ComfyUI builds as a supported LLM."""
    names = []
    for name in folder_paths.get_filename_list(TEXT_ENCODERS):
        if not name.lower().endswith(SAFETENSORS_EXTENSIONS):
            continue
        path = folder_paths.get_full_path(TEXT_ENCODERS, name)
        if path and detect_llm(path) in SUPPORTED_TE_MODELS:
            names.append(SINGLE_FILE_PREFIX + name)
    return names


def resolve_llm_file(llm_name: str) -> str | None:
    """The file an `llm_name` choice means, or None when it is a models/LLM folder (the folder path as before)."""
    if not llm_name.startswith(SINGLE_FILE_PREFIX):
        return None
    if any(os.path.isdir(os.path.join(root, llm_name)) for root in folder_paths.get_folder_paths(LLM_FOLDER)):
        return None  # a models/LLM folder of that name existed first: keep meaning it
    path = resolve_in_folder(TEXT_ENCODERS, llm_name[len(SINGLE_FILE_PREFIX):], want_dir=False, what="text encoder file")
    kind = detect_llm(path)
    if kind not in SUPPORTED_TE_MODELS:
        found = f"ComfyUI recognises it as {kind}" if kind else "ComfyUI does not recognise its weight names"
        raise ValueError(
            f"{llm_name} is not a decoder-only LLM the adapter can use ({found}). Single files work for ComfyUI's "
            "Qwen 2.5 3B/7B, Qwen 3 4B, Llama 3 8B, Gemma 2 2B and Gemma 3 4B text encoders; for other models "
            "put a Hugging Face folder in models/LLM."
        )
    return path


def load_llm_file(path: str, llm_name: str, memory_mode: str = "auto", dtype: str = "auto", quantization: str = "none"):
    """An LLMDIFF_LLM handle for a single file, loaded by ComfyUI as CLIPLoader would load it (in the file's own
    precision: Load LLM's `dtype` is ignored, its `quantization` refused)."""
    import comfy.sd

    from .comfy_llm import handle_from_clip
    from .handles import file_identity

    if quantization != "none":
        raise ValueError("8/4-bit loading is for Hugging Face folders; single files use ComfyUI's own formats "
                         "(fp8 files load as they are). Set quantization to none.")
    if dtype != "auto":
        log.info("dtype %s ignored for %s: ComfyUI keeps a single file's own precision", dtype, llm_name)
    log.info("Loading %s with ComfyUI's own text-encoder implementation", path)
    clip = comfy.sd.load_clip(ckpt_paths=[path], embedding_directory=folder_paths.get_folder_paths("embeddings"))
    return handle_from_clip(clip, llm_name, identity=file_identity(path), memory_mode=memory_mode)
