"""Run a prompt through the LLM and the adapter (cached), or through a connected CLIP."""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

import comfy.model_management as mm

from .encode_cache import EncodeCache
from .handles import AdapterHandle, LLMHandle, load_for_encoding

# Module-level so it outlives single prompts; bounded (see encode_cache.py for the size).
ENCODE_CACHE = EncodeCache()


class AdapterEncoding(NamedTuple):
    context: torch.Tensor  # [1, N, C] fp32 on ComfyUI's intermediate device
    pooled: Optional[torch.Tensor]  # [1, P] or None
    prompt_info: object  # adapter.PromptInfo
    from_cache: bool


def encode_with_adapter(llm: LLMHandle, adapter: AdapterHandle, text: str) -> AdapterEncoding:
    """The adapter's conditioning for one prompt; the LLM runs only on a cache miss."""
    key = (llm.identity, adapter.identity, text)
    hit = ENCODE_CACHE.get(key)
    if hit is not None:
        return hit._replace(from_cache=True)

    from ..adapter import encode_prompts

    mm.throw_exception_if_processing_interrupted()
    load_for_encoding(llm, adapter)
    with torch.no_grad():
        encoded = encode_prompts(llm.loaded, adapter.config.template, [text])
        mm.throw_exception_if_processing_interrupted()
        device = adapter.patcher.load_device
        out = adapter.module(encoded.hidden_states.to(device=device, dtype=torch.float32), encoded.attention_mask.to(device))
    keep = lambda t: None if t is None else t.detach().to(device=mm.intermediate_device(), dtype=torch.float32)  # noqa: E731
    result = AdapterEncoding(keep(out.context), keep(out.pooled), encoded.infos[0], from_cache=False)
    ENCODE_CACHE.put(key, result)
    return result


def encode_with_clip(clip, text: str) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """CLIP's (context [1, 77k, C], pooled) for `text`, A1111 weights and embeddings honoured as in CLIPTextEncode."""
    out = clip.encode_from_tokens(clip.tokenize(text), return_pooled=True, return_dict=True)
    return out["cond"], out.get("pooled_output")
