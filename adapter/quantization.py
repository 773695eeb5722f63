"""8-bit and 4-bit loading of a Hugging Face LLM folder through bitsandbytes (optional, CUDA only).

bitsandbytes quantises the Linear layers while transformers loads them: LLM.int8 for `8bit`
(about half the bf16 memory) and NF4 with double quantisation for `4bit` (about a quarter), the
other weights in the chosen dtype, which is also the 4-bit compute dtype. It is an optional
dependency (`pip install bitsandbytes`; transformers also needs accelerate for it) and runs on
NVIDIA GPUs only, so every other case fails here, before anything is read, with what to do.
"""
from __future__ import annotations

import importlib.util

import torch

from .errors import LLMLoadError

QUANTIZATIONS = ("none", "8bit", "4bit")


def _installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def bitsandbytes_config(quantization: str, device, compute_dtype: torch.dtype):
    """transformers' BitsAndBytesConfig for `8bit` / `4bit` on a CUDA device; None for `none`."""
    if quantization not in QUANTIZATIONS:
        raise LLMLoadError(f"quantization must be one of {', '.join(QUANTIZATIONS)}; got {quantization!r}")
    if quantization == "none":
        return None
    device = torch.device(device)
    if device.type != "cuda":
        raise LLMLoadError(
            f"{quantization} loading uses bitsandbytes, which needs an NVIDIA GPU (CUDA), but the LLM would run on "
            f"{device}. Set quantization to 'none' (dtype bf16 halves the memory of fp32)."
        )
    missing = [name for name in ("bitsandbytes", "accelerate") if not _installed(name)]
    if missing:
        raise LLMLoadError(
            f"{quantization} loading needs the optional package{'s' if len(missing) > 1 else ''} {' and '.join(missing)}: "
            f"run `pip install {' '.join(missing)}` with ComfyUI's Python and restart ComfyUI, or set quantization to 'none'."
        )
    from transformers import BitsAndBytesConfig

    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype)
