"""How the LLM and the adapter get onto their device for one run, and what happens to them after.

Everything goes through ComfyUI's model management (`comfy.model_management`), so our models
are loaded, offloaded and partially loaded by the same bookkeeping as ComfyUI's own text encoders
(`current_loaded_models`) and ComfyUI can take the memory back when the UNet needs it.

Partial (lowvram) loading: ModelPatcher can leave part of a model's weights on the offload device
only for modules that cast their weights to the compute device on the fly (ComfyUI's `comfy.ops`
layers, marked by `comfy_cast_weights`). ComfyUI's own text-encoder implementations are built from
them; a transformers model is plain `torch.nn` (Linear, Embedding, its own RMSNorm classes): a
module left behind keeps its weights on the CPU and the forward fails with a device mismatch. So
a transformers LLM is always loaded in full, and a ComfyUI-implemented one (`LLMHandle.partial_load`)
may be loaded partially unless the user asks to keep it fully loaded (test_nodes_memory.py shows
both, with `meta` standing in for the GPU). ComfyUI may still *unload*
part of a plain model afterwards when another model needs the memory (`LoadedModel.model_unload`
with a byte budget calls `partially_unload`); the next full load moves everything back.

The memory options (`memory_mode`, on the LLM loaders):
- `auto`: ComfyUI decides: partial loading where the model supports it; after encoding the LLM stays
  on its load device until ComfyUI needs the memory (what ComfyUI does with its own text encoders).
- `keep_loaded`: always fully loaded (never split across devices, fastest encodes) and left loaded.
  ComfyUI can still offload it when another model needs the memory: nothing pins VRAM.
- `unload_after`: after each run, ComfyUI's model management offloads it to the offload device
  (the same `LoadedModel.model_unload` + removal from `current_loaded_models` that `free_memory`
  does), so the UNet gets the memory at once instead of by partial eviction during sampling.

Working memory: `load_models_gpu(memory_required=...)` is how a caller tells ComfyUI what a run
needs on top of the weights (ComfyUI's VAE passes its decode estimate the same way); ComfyUI frees
that much, and never less than its own minimum inference reserve (about 0.8 GiB + reserved VRAM).
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

import comfy.model_management as mm

log = logging.getLogger(__name__)

MEMORY_MODES = ["auto", "keep_loaded", "unload_after"]
MEMORY_MODE_TOOLTIP = (
    "auto: ComfyUI decides (partial loading where the model supports it; the LLM stays loaded until the "
    "memory is needed). keep_loaded: always load it fully and leave it loaded between prompts (fastest; "
    "ComfyUI can still offload it when another model needs the memory). unload_after: offload it after "
    "each prompt so the UNet gets the memory at once (slower when the prompt changes)."
)
FP32_BYTES = 4


def check_memory_mode(mode: str) -> str:
    if mode not in MEMORY_MODES:
        raise ValueError(f"memory_mode must be one of {', '.join(MEMORY_MODES)}; got {mode!r}")
    return mode


@dataclass(frozen=True)
class LLMShape:
    """The sizes that decide a run's activation memory."""

    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    vocab_size: int
    bytes_per_value: int  # of the LLM's compute dtype


def llm_shape(llm) -> LLMShape:
    """Sizes of an LLMHandle's model, from its LLMInfo and its config (transformers' or ComfyUI's, same field names)."""
    model = llm.loaded.model
    config = getattr(model, "config", None) or getattr(getattr(model, "model", None), "config", None)
    hidden = int(llm.info.hidden_size)
    get = lambda name, default: int(getattr(config, name, None) or default)  # noqa: E731
    # Activations are in the compute dtype: ComfyLLM says so (fp32); a transformers model computes in its
    # weights' dtype, and 8/4-bit storage in a wider one: at least 2 bytes per value.
    dtype = getattr(llm.loaded, "compute_dtype", None) or getattr(llm.loaded, "dtype", torch.float32)
    bytes_per_value = max(2, dtype.itemsize) if isinstance(dtype, torch.dtype) else FP32_BYTES
    return LLMShape(
        num_layers=int(llm.info.num_layers), hidden_size=hidden, intermediate_size=get("intermediate_size", 4 * hidden),
        num_heads=get("num_attention_heads", max(1, hidden // 64)), vocab_size=get("vocab_size", 0),
        bytes_per_value=bytes_per_value,
    )


def _block_transients(shape: LLMShape, tokens: int, batch: int) -> int:
    """One block's temporaries: the MLP's gate/up/product and fp32 attention scores (the eager worst case)."""
    mlp = 3 * batch * tokens * shape.intermediate_size * shape.bytes_per_value
    attention = batch * shape.num_heads * tokens * tokens * FP32_BYTES + 4 * batch * tokens * shape.hidden_size * shape.bytes_per_value
    return mlp + attention


def encode_working_memory(shape: LLMShape, num_tokens: int, batch: int = 1) -> int:
    """Bytes the LLM run for the adapter needs besides the weights: the states of every block, twice
    (the per-block list and the stacked [B, L+1, T, H] tensor), plus one block's temporaries."""
    states = batch * (shape.num_layers + 1) * num_tokens * shape.hidden_size * shape.bytes_per_value
    return 2 * states + _block_transients(shape, num_tokens, batch)


def adapter_working_memory(shape: LLMShape, num_tokens: int, batch: int = 1) -> int:
    """Bytes the adapter's run needs besides its weights: the [B, L+1, T, H] states in fp32 and their
    per-layer normalised copy (the refiner and resampler work on T and 77 tokens, far less)."""
    return 2 * batch * (shape.num_layers + 1) * num_tokens * shape.hidden_size * FP32_BYTES


def generate_working_memory(shape: LLMShape, total_tokens: int, head_bytes: int) -> int:
    """Bytes a generation needs besides the weights: the KV cache at full length (upper bound: as if
    every head had its own K/V), one block's temporaries, fp32 logits/probabilities (3 x vocab) and
    the output head when it has to be brought to the device for the run."""
    kv_cache = 2 * shape.num_layers * total_tokens * shape.hidden_size * shape.bytes_per_value
    logits = 3 * shape.vocab_size * FP32_BYTES
    return kv_cache + _block_transients(shape, total_tokens, 1) + logits + head_bytes


def _follow_patcher(llm, device: torch.device) -> None:
    """Keep LoadedLLM.device (where input ids are sent) in step with the weights ModelPatcher moved."""
    try:
        llm.loaded.device = device
    except AttributeError:  # a read-only property already follows the weights
        pass


@contextlib.contextmanager
def llm_on_device(llm, memory_required: int = 0) -> Iterator[None]:
    """Have ComfyUI load the LLM for one run (with `memory_required` bytes of working memory), then apply its memory_mode."""
    mode = check_memory_mode(getattr(llm, "memory_mode", "auto"))
    partial = bool(getattr(llm, "partial_load", False)) and mode != "keep_loaded"
    mm.load_models_gpu([llm.patcher], memory_required=memory_required, force_full_load=not partial)
    _follow_patcher(llm, llm.patcher.load_device)
    try:
        yield
    finally:
        if mode == "unload_after":
            unload_models([llm.patcher])
            _follow_patcher(llm, llm.patcher.offload_device)


def load_adapter_for_run(adapter, memory_required: int = 0) -> None:
    """Have ComfyUI load the adapter (plain torch modules: always in full) with its working memory."""
    mm.load_models_gpu([adapter.patcher], memory_required=memory_required, force_full_load=True)


def unload_models(patchers: Sequence) -> int:
    """Offload these models through ComfyUI's own bookkeeping; returns how many were loaded.

    This is the body of `comfy.model_management.free_memory` for the chosen models only:
    `LoadedModel.model_unload()` moves the weights to the patcher's offload device, and the entry
    leaves `current_loaded_models`, so ComfyUI's accounting and the weights agree.
    """
    unloaded = 0
    for index in range(len(mm.current_loaded_models) - 1, -1, -1):
        loaded = mm.current_loaded_models[index]
        if any(loaded.model is patcher for patcher in patchers):
            loaded.model_unload()
            mm.current_loaded_models.pop(index)
            unloaded += 1
    if unloaded:
        mm.soft_empty_cache()
    return unloaded

