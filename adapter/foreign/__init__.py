"""Published adapters of other architectures, loaded from their own files (no config inside).

- `rouwei.py`: RouWei-Gemma / RouWei-T5Gemma (`LLMToSDXLAdapter`, LLM -> SDXL);
- `ella.py`: ELLA's timestep-aware connector (T5 -> SD1.5);
- `layouts.py`: which file is which (key layout), dimensions from tensor shapes, loading;
- `text.py`: their text sides (Gemma chat template, T5 / T5Gemma encoders).

Each module has the interface of our own `LLMDiffAdapter` that the encode path and the per-step
wrapper use (`encode_states`, `decode`, `forward`, `timestep_aware`, `.config.target`), so the nodes
run them through the same code; `.config` is a `ForeignConfig`.
"""
from .ella import EllaAdapter, EllaConfig
from .layouts import (LAYOUTS, TRAINING_METADATA_KEY, ForeignConfig, build_foreign_adapter, file_shapes, load_foreign_adapter,
                      recognise, save_foreign_adapter)
from .rouwei import RouWeiAdapter, RouWeiConfig
from .text import TextSide, encode_text, is_encoder, load_text_encoder

__all__ = ["EllaAdapter", "EllaConfig", "RouWeiAdapter", "RouWeiConfig", "LAYOUTS", "ForeignConfig", "build_foreign_adapter",
           "file_shapes", "load_foreign_adapter", "recognise", "save_foreign_adapter", "TRAINING_METADATA_KEY", "TextSide", "encode_text", "is_encoder",
           "load_text_encoder", "is_foreign", "load_any_adapter", "describe_adapter"]


def is_foreign(config) -> bool:
    return isinstance(config, ForeignConfig)


def load_any_adapter(path, device="cpu", dtype=None):
    """Our own file format when the file says so (unchanged path), else a recognised published layout."""
    import torch

    from ..file_format import FORMAT, load_adapter, read_header

    dtype = dtype or torch.float32
    metadata = read_header(path).get("__metadata__") or {}
    if isinstance(metadata, dict) and metadata.get("format") == FORMAT:
        return load_adapter(path, device=device, dtype=dtype)
    return load_foreign_adapter(path, device=device, dtype=dtype)


def describe_adapter(module) -> str:
    """One paragraph for the loader's `info`: what kind of adapter this is and its sizes."""
    from ..model import FALLBACK_TIMESTEP

    config = module.config
    if is_foreign(config):
        text = config.describe()
        if config.timestep_aware:
            text += (f". Timestep-aware: through 'Apply LLM Diff Adapter' its context is recomputed at every sampling "
                     f"step's timestep; without it, the conditioning holds the context at the fixed timestep {FALLBACK_TIMESTEP:g}")
        return text
    target, arch, llm = config.target, config.arch, config.llm
    pooled = f" + pooled {target.pooled_dim}" if target.pooled_dim else ""
    return (f"LLM Diff Adapter [ours] for {llm.architecture} (hidden {llm.hidden_size}, {llm.num_layers} layers) -> "
            f"{target.family} context {target.num_tokens} x {target.context_dim}{pooled}; width {arch.width}, "
            f"{arch.refiner_layers} refiner + {arch.resampler_layers} resampler blocks"
            + ("; timestep-aware" if module.timestep_aware else ""))
