"""An adapter's conditioning of prompts, as the trainer computes it: the one path from prompts to the
(context, pooled) a UNet reads, shared by the training step, the trainer's validation images and the
shapes benchmark, so what is trained is what is sampled and scored.

    encoded = encode_for(adapter, llm, adapter.config.template, prompts)    # the frozen LLM's side
    context, pooled = adapter_context(adapter, encoded, clip_context=None, timesteps=t)
    context_at = adapter_context_at(adapter, llm, prompts)               # for training.sampling.ddim_sample

Our adapters read every layer's states through the recorded chat template; a published one (RouWei, ELLA)
reads its own text side, with the defaults LLMDiffTextEncode uses. In the CLIP-concat mode the frozen CLIP
tokens follow the adapter's (the order LLMDiffTextEncode's `concat` uses).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import nn

from adapter import encode_prompts
from adapter.foreign import is_foreign
from adapter.foreign.text import encode_text, node_text_side


class ForeignEncoded(NamedTuple):
    """A published adapter's input in the fields adapter_context reads (EncodedPrompts has the same two)."""

    hidden_states: torch.Tensor
    attention_mask: torch.Tensor


def encode_for(adapter: nn.Module, llm, template, prompts: list[str]):
    """The adapter's input for `prompts`: every layer's states through our chat template for our adapters; for a
    published one (RouWei, ELLA) its own text side with the node's default settings, through the same
    adapter.foreign.text.encode_text that LLMDiffTextEncode runs, so what is trained is what is sampled."""
    config = adapter.config
    if is_foreign(config):
        states = encode_text(llm, node_text_side(config, llm), prompts)
        return ForeignEncoded(states.states.float(), states.mask)
    return encode_prompts(llm, template, prompts)


def adapter_context(adapter: nn.Module, encoded, clip_context: Optional[torch.Tensor],
                    timesteps: Optional[torch.Tensor] = None):
    """LLM states -> (context [B, N(+77), C], pooled or None): the adapter's conditioning, followed by the frozen
    CLIP tokens when training the CLIP-concat mode (the order LLMDiffTextEncode's `concat` uses: adapter
    tokens first, then CLIP's). Shared by the training step and the validation sampler. `timesteps` [B] is
    each sample's diffusion timestep: a timestep-aware adapter is conditioned on it, a static one ignores it."""
    return with_clip(adapter(encoded.hidden_states, encoded.attention_mask, timesteps), clip_context)


def with_clip(out, clip_context: Optional[torch.Tensor]):
    """AdapterOutput -> (context, pooled), with the CLIP tokens appended in the CLIP-concat mode."""
    context = out.context
    if clip_context is not None:
        context = torch.cat([context, clip_context.to(context.dtype)], dim=1)
    return context, out.pooled


@torch.no_grad()
def adapter_context_at(adapter: nn.Module, llm, prompts: list[str], clip_context: Optional[torch.Tensor] = None):
    """`context_at(t)` for training.sampling.ddim_sample: the adapter's conditioning of `prompts` (positives then
    negatives). The LLM runs once; a timestep-aware adapter decodes its t-independent states at each sampler
    timestep, a static one returns the same tensors every time."""
    encoded = encode_for(adapter, llm, getattr(adapter.config, "template", None), prompts)
    if adapter.timestep_aware:
        states = adapter.encode_states(encoded.hidden_states, encoded.attention_mask)
        return lambda t: with_clip(adapter.decode(states, encoded.attention_mask, t), clip_context)
    fixed = adapter_context(adapter, encoded, clip_context)
    return lambda t: fixed
