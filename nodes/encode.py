"""Run a prompt through the LLM and the adapter (cached), or through a connected CLIP."""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

import comfy.model_management as mm

from .encode_cache import EncodeCache
from .handles import AdapterHandle, LLMHandle
from .memory import adapter_working_memory, encode_working_memory, llm_on_device, llm_shape, load_adapter_for_run

# Module-level so it outlives single prompts; bounded by entries and bytes, stored on ComfyUI's
# intermediate device (see encode_cache.py).
ENCODE_CACHE = EncodeCache(storage_device=mm.intermediate_device)


class AdapterEncoding(NamedTuple):
    context: torch.Tensor  # [1, N, C] fp32 on ComfyUI's intermediate device
    pooled: Optional[torch.Tensor]  # [1, P] or None
    prompt_info: object  # adapter.PromptInfo
    from_cache: bool
    # Timestep-aware adapters only (else None): the prompt's timestep-independent part
    # (adapter.model.EncodedStates) and its [1, T] mask, for LLMDiffApplyAdapter (nodes/step_states.py).
    states: Optional[object] = None
    mask: Optional[torch.Tensor] = None


def encode_with_adapter(llm: LLMHandle, adapter: AdapterHandle, text: str) -> AdapterEncoding:
    """The adapter's conditioning for one prompt; the LLM runs only on a cache miss."""
    key = (llm.identity, adapter.identity, text)
    hit = ENCODE_CACHE.get(key)
    if hit is not None:
        return hit._replace(from_cache=True)

    from ..adapter import encode_prompts, tokenize_prompts

    mm.throw_exception_if_processing_interrupted()
    template = adapter.config.template
    # The exact sequence length for the memory estimate (tokenizing again inside encode_prompts costs ~1 ms).
    num_tokens = tokenize_prompts(llm.loaded.tokenizer, template, [text]).input_ids.shape[1]
    shape = llm_shape(llm)
    with torch.no_grad():
        with llm_on_device(llm, memory_required=encode_working_memory(shape, num_tokens)):
            encoded = encode_prompts(llm.loaded, template, [text])
        mm.throw_exception_if_processing_interrupted()
    return run_adapter(adapter, key, encoded.hidden_states, encoded.attention_mask, encoded.infos[0],
                       adapter_working_memory(shape, num_tokens))


def run_adapter(adapter: AdapterHandle, key, hidden_states: torch.Tensor, mask: torch.Tensor, info,
                memory_required: int) -> AdapterEncoding:
    """The adapter on one prompt's text-model states, stored in the encode cache under `key`: encode_states then
    decode (exactly adapter.module(hidden_states, mask); a timestep-aware one at its fallback timestep), and for a
    timestep-aware adapter the t-independent states the per-step wrapper decodes again at every UNet call."""
    with torch.no_grad():
        load_adapter_for_run(adapter, memory_required=memory_required)
        device = adapter.patcher.load_device
        mask = mask.to(device)
        states = adapter.module.encode_states(hidden_states.to(device=device, dtype=torch.float32), mask)
        out = adapter.module.decode(states, mask)
    as_fp32 = lambda t: None if t is None else t.to(dtype=torch.float32)  # noqa: E731
    step = (states, mask) if adapter.module.timestep_aware else (None, None)
    # put() detaches and moves the tensors to the intermediate device; the conditioning uses that copy.
    return ENCODE_CACHE.put(key, AdapterEncoding(as_fp32(out.context), as_fp32(out.pooled), info, from_cache=False,
                                                 states=step[0], mask=step[1]))


def encode_with_clip(clip, text: str) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """CLIP's (context [1, 77k, C], pooled) for `text`, A1111 weights and embeddings honoured as in CLIPTextEncode."""
    out = clip.encode_from_tokens(clip.tokenize(text), return_pooled=True, return_dict=True)
    return out["cond"], out.get("pooled_output")


class ForeignPromptInfo(NamedTuple):
    """What `info` reports for a published adapter's prompt (adapter.foreign.text.TextStates per prompt)."""

    tokens: int  # states the adapter reads
    dropped: int  # tokens cut over the text side's max_length
    prefix_tokens: int  # Gemma chat: template + system tokens before the prompt (0 for encoders)


def encode_with_foreign(llm: LLMHandle, adapter: AdapterHandle, text: str, side) -> AdapterEncoding:
    """A published adapter's conditioning (RouWei, ELLA) for one prompt: its text side, then the same
    encode_states / decode split as ours; `side` is the adapter's TextSide with the node's settings."""
    key = (llm.identity, adapter.identity, text, side)
    hit = ENCODE_CACHE.get(key)
    if hit is not None:
        return hit._replace(from_cache=True)

    from ..adapter.foreign.text import encode_text

    mm.throw_exception_if_processing_interrupted()
    shape = llm_shape(llm)
    budget = side.max_length + side.skip_first + 64  # an upper bound on the tokens the text model sees
    with torch.no_grad():
        with llm_on_device(llm, memory_required=encode_working_memory(shape, budget)):
            states = encode_text(llm.loaded, side, [text])
        mm.throw_exception_if_processing_interrupted()
    info = ForeignPromptInfo(states.tokens[0], states.dropped[0], states.prefix_tokens)
    return run_adapter(adapter, key, states.states, states.mask, info, adapter_working_memory(shape, budget))
