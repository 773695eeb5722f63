"""Where the pack's models live: the `LLM` and `llm_adapters` folder types, listing and safe resolution.

ComfyUI's `folder_paths` knows only the model kinds it ships. We add two:
- `LLM`: one Hugging Face folder per model (`config.json`, safetensors shards, tokenizer files),
  listed as folders, not files.
- `llm_adapters`: `*.safetensors` adapter files.
Both honour `extra_model_paths.yaml` (an `LLM:` or `llm_adapters:` entry there adds a search
root): ComfyUI reads that file *before* it imports custom nodes, so a root may already be
registered when we get here, with the empty extension filter that lists every file. We keep its
roots, put ours after them and set the filter.
"""
from __future__ import annotations

import os

import folder_paths

LLM_FOLDER = "LLM"
ADAPTER_FOLDER = "llm_adapters"
ADAPTER_EXTENSIONS = {".safetensors"}  # never pickles: .ckpt/.pt/.bin are not listed at all
# ComfyUI marks folder-of-models types with the pseudo extension "folder" (see its "diffusers" entry),
# so get_filename_list() on our LLM type lists nothing misleading.
LLM_EXTENSIONS = {"folder"}


def register_model_folders() -> None:
    """Add `models/LLM` and `models/llm_adapters` to ComfyUI's folder registry (idempotent)."""
    for name, extensions in ((LLM_FOLDER, LLM_EXTENSIONS), (ADAPTER_FOLDER, ADAPTER_EXTENSIONS)):
        default = os.path.join(folder_paths.models_dir, name)
        roots, _ = folder_paths.folder_names_and_paths.get(name, ([], set()))
        if default not in roots:
            roots = [*roots, default]
        folder_paths.folder_names_and_paths[name] = (roots, set(extensions))


def list_adapters() -> list[str]:
    """Adapter file names (relative to their root) for the loader's dropdown."""
    return folder_paths.get_filename_list(ADAPTER_FOLDER)


def list_llms() -> list[str]:
    """LLM folder names for the loader's dropdown.

    Every direct subfolder of a root is listed (one without `config.json` too, so that a
    half-copied model fails at load with a message saying what is missing, instead of silently
    vanishing from the list); a subfolder that only groups models (`Qwen/Qwen2.5-7B-Instruct`)
    is listed through the model folders inside it.
    """
    names: set[str] = set()
    for root in folder_paths.get_folder_paths(LLM_FOLDER):
        if not os.path.isdir(root):
            continue
        for entry in sorted(os.scandir(root), key=lambda e: e.name):
            if entry.name.startswith(".") or not entry.is_dir():
                continue
            if os.path.isfile(os.path.join(entry.path, "config.json")):
                names.add(entry.name)
                continue
            nested = [
                f"{entry.name}/{sub.name}"
                for sub in os.scandir(entry.path)
                if sub.is_dir() and os.path.isfile(os.path.join(sub.path, "config.json"))
            ]
            names.update(nested or [entry.name])
    return sorted(names)


def resolve_in_folder(folder_type: str, name: str, want_dir: bool, what: str | None = None) -> str:
    """The absolute path of `name` inside one of `folder_type`'s roots, or a ValueError/FileNotFoundError.

    ComfyUI's combo validation already rejects names that are not in the list, but a workflow
    can be posted straight to the API, and `folder_paths.get_full_path` silently rewrites
    `../x` to `x`. We refuse anything that would leave the root instead: an absolute path, a
    drive, or `..` that climbs out. Symlinks inside a root are allowed on purpose (people link
    their model stores), so the check is on the normalised name, not the resolved target.
    """
    what = what or ("LLM folder" if want_dir else "adapter file")
    if not name or not name.strip():
        raise ValueError(f"No {what} selected: put one in models/{folder_type}/ and pick it in the node.")
    normalised = os.path.normpath(name.replace("\\", "/"))
    if os.path.isabs(normalised) or os.path.splitdrive(normalised)[0] or normalised in (".", "..") or normalised.startswith(".." + os.sep):
        raise ValueError(
            f"The {what} name {name!r} points outside models/{folder_type}/. "
            f"Use a name relative to that folder, as listed in the node's dropdown."
        )
    roots = folder_paths.get_folder_paths(folder_type)
    for root in roots:
        candidate = os.path.join(root, normalised)
        if os.path.isdir(candidate) if want_dir else os.path.isfile(candidate):
            return os.path.abspath(candidate)
    raise FileNotFoundError(
        f"The {what} {name!r} was not found in any of: {', '.join(roots)}. "
        f"Copy it there (or add an `{folder_type}:` entry to extra_model_paths.yaml) and refresh the node list."
    )
