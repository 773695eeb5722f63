"""LLM Diff Text Encode's work: a prompt through the LLM and the adapter (cached), and a connected CLIP, into
CONDITIONING and the `info` text (`encode_prompt`); the node itself only checks its numbers and calls it."""
from __future__ import annotations

import logging
from typing import NamedTuple, Optional

import torch

import comfy.model_management as mm
import comfy.utils

from .conditioning import SDXL_SIZE_FIELDS, build_conditioning, check_concat_has_clip
from .encode_cache import EncodeCache
from .handles import AdapterHandle, LLMHandle
from .info_text import ITEM, describe_encoding, describe_foreign
from .input_checks import sanitize_text
from .memory import adapter_working_memory, encode_working_memory, llm_on_device, llm_shape, load_adapter_for_run
from .prompt_weights import strip_prompt_weights
from .text_encode import DEFAULT_SIZE

log = logging.getLogger(__name__)

# Module-level so it outlives single prompts; bounded by entries and bytes, stored on ComfyUI's
# intermediate device (see encode_cache.py).
ENCODE_CACHE = EncodeCache(storage_device=mm.intermediate_device)


def encode_prompt(
    llm: LLMHandle, adapter: AdapterHandle, text: str, clip=None, *, clip_mode: str = "none", llm_strength: float = 1.0,
    clip_strength: float = 1.0, pooled_blend: float = 0.0, sdxl_size: dict[str, int], system_prompt: str = "",
    skip_first: int = -1, t5_padding: str = "max_length",
) -> tuple[list, str]:
    """(CONDITIONING, info) for one prompt, with LLM Diff Text Encode's inputs; `sdxl_size` holds SDXL_SIZE_FIELDS."""
    from ..adapter.foreign import is_foreign
    from ..adapter.foreign.text import check_pairing, node_text_side

    text, replaced = sanitize_text(text, "the prompt")
    system_prompt, replaced_system = sanitize_text(system_prompt, "the system prompt")
    config = adapter.config
    foreign = is_foreign(config)
    # Before any work: names both sides and the fix (a T5 encoder with a Gemma adapter, and so on).
    check_pairing(config, llm.loaded, adapter.name, llm.name)
    side = node_text_side(config, llm.loaded, system_prompt, skip_first, t5_padding, llm.backend) if foreign else None
    check_concat_has_clip(clip_mode == "concat", clip)
    progress = comfy.utils.ProgressBar(2)
    notes: list[str] = [note for note in (replaced, replaced_system) if note]

    llm_text, stripped = strip_prompt_weights(text)
    if stripped:
        notes.append("A1111 weights/escapes such as (word:1.2) were removed from the LLM's text" + (" (CLIP honours them)" if clip is not None else ""))
    encoding = encode_with_foreign(llm, adapter, llm_text, side) if foreign else encode_with_adapter(llm, adapter, llm_text)
    if encoding.from_cache:
        notes.append("reused the cached encoding of this prompt (the LLM did not run)")
    progress.update(1)

    clip_context, clip_pooled = encode_with_clip(clip, text, config) if clip is not None else (None, None)
    mm.throw_exception_if_processing_interrupted()
    progress.update(1)

    is_sdxl = config.target.pooled_dim is not None
    sizes = tuple(sdxl_size[name] for name in SDXL_SIZE_FIELDS)
    notes.extend(_ignored_inputs(config, is_sdxl, clip is not None, clip_mode, pooled_blend, sizes, adapter.module.timestep_aware))
    notes.extend(_ignored_text_settings(config, side, system_prompt, skip_first, t5_padding))
    conditioning = build_conditioning(
        encoding.context, encoding.pooled, clip_context=clip_context, clip_pooled=clip_pooled,
        concat_clip=clip_mode == "concat", llm_strength=llm_strength, clip_strength=clip_strength,
        pooled_blend=pooled_blend if is_sdxl else 0.0, device=mm.intermediate_device(),
        sdxl_size=sdxl_size if is_sdxl else None,
    )
    _check_conditioning_finite(conditioning, encoding, llm.name, adapter.name)
    if encoding.states is not None:  # timestep-aware: the states Apply LLM Diff Adapter decodes at every step
        from .timestep_aware.model_cond import attach_step_states

        conditioning = attach_step_states(conditioning, encoding, adapter, llm, llm_strength)
    return conditioning, _info(llm, adapter, side, encoding.prompt_info, notes)


class AdapterEncoding(NamedTuple):
    context: torch.Tensor  # [1, N, C] fp32 on ComfyUI's intermediate device
    pooled: Optional[torch.Tensor]  # [1, P] or None
    prompt_info: object  # adapter.PromptInfo
    from_cache: bool
    # Timestep-aware adapters only (else None): the prompt's timestep-independent part
    # (adapter.model.EncodedStates) and its [1, T] mask, for LLMDiffApplyAdapter (nodes/timestep_aware/model_cond.py).
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


def encode_with_clip(clip, text: str, config) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """CLIP's (context [1, 77k, C], pooled) for `text`, A1111 weights and embeddings honoured as in CLIPTextEncode;
    refused when its widths do not fit the adapter's target (`config`), naming both."""
    from ..adapter import check_context_dim

    out = clip.encode_from_tokens(clip.tokenize(text), return_pooled=True, return_dict=True)
    context, pooled = out["cond"], out.get("pooled_output")
    wants_pooled = config.target.pooled_dim is not None and pooled is not None
    check_context_dim(config, context.shape[-1], pooled.shape[-1] if wants_pooled else None, "the CLIP connected to LLM Diff Text Encode")
    return context, pooled


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


def _info(llm: LLMHandle, adapter: AdapterHandle, side, prompt_info, notes: list[str]) -> str:
    """The node's `info` text; its warnings and truncations also go to ComfyUI's log."""
    common = dict(llm_name=llm.name, llm_info=llm.info, adapter_name=adapter.name, config=adapter.config,
                  prompt_info=prompt_info, notes=notes)
    info = describe_foreign(side=side, **common) if side is not None else describe_encoding(**common)
    for line in info.splitlines():
        if line.removeprefix(ITEM).startswith(("warning:", "truncated:")):
            log.warning("LLM Diff Text Encode: %s", line.removeprefix(ITEM))
    return info


def _check_conditioning_finite(conditioning, encoding, llm_name: str, adapter_name: str) -> None:
    """Refuse to hand a sampler NaN or infinite conditioning (it would draw a black image and report success)."""
    tokens, extras = conditioning[0]
    pooled = extras.get("pooled_output")
    if bool(torch.isfinite(tokens).all()) and (pooled is None or bool(torch.isfinite(pooled).all())):
        return
    adapter_bad = not bool(torch.isfinite(encoding.context).all()) or (
        encoding.pooled is not None and not bool(torch.isfinite(encoding.pooled).all()))
    source = (f"the adapter {adapter_name} with the LLM {llm_name} (a damaged or diverged adapter file, or an LLM in a "
              "precision that overflows: try dtype fp32 or bf16)" if adapter_bad else "the connected CLIP")
    raise ValueError(f"LLM Diff Text Encode: the conditioning holds NaN or infinite values, produced by {source}; "
                     "nothing was passed on to the sampler.")


def _ignored_inputs(config, is_sdxl: bool, has_clip: bool, clip_mode: str, pooled_blend: float, sizes: tuple,
                    timestep_aware: bool) -> list[str]:
    """Say which settings had no effect, so a user does not tune a knob that does nothing."""
    notes = []
    if not is_sdxl and sizes != (DEFAULT_SIZE, DEFAULT_SIZE, 0, 0, DEFAULT_SIZE, DEFAULT_SIZE):
        notes.append(f"width/height/crop/target fields are SDXL-only and were ignored for this {config.target.family} adapter")
    if pooled_blend > 0 and not (is_sdxl and has_clip):
        notes.append("pooled_blend was ignored: it needs an SDXL adapter and a connected CLIP")
    if timestep_aware:
        from ..adapter.model import FALLBACK_TIMESTEP

        notes.append(f"this adapter is timestep-aware: with the MODEL passed through 'Apply LLM Diff Adapter "
                     "(timestep-aware)', as in the shipped timestep-aware workflow, its context is recomputed at every "
                     f"sampling step's real timestep; without that node the sampler uses the context at the fixed "
                     f"timestep {FALLBACK_TIMESTEP:g}")
    if config.concat_clip and clip_mode != "concat":
        notes.append("this adapter was trained with CLIP tokens beside its own: set clip_mode to 'concat' and connect the CLIP for the results it was trained for")
    if not config.concat_clip and clip_mode == "concat":
        notes.append("this adapter was trained without CLIP tokens; 'concat' adds them anyway (lower clip_strength if they dominate)")
    return notes


def _ignored_text_settings(config, side, system_prompt: str, skip_first: int, t5_padding: str) -> list[str]:
    """The published adapters' text settings that do nothing for this adapter."""
    notes = []
    gemma = side is not None and side.encoder in ("gemma_chat", "any")
    encoder = side is not None and side.encoder in ("t5", "t5gemma")
    if (system_prompt or skip_first != -1) and not gemma:
        notes.append("system_prompt / skip_first are for RouWei-Gemma adapters and were ignored" +
                     ("" if side is not None else " (this adapter's file holds its own prompt template)"))
    if t5_padding != "max_length" and not encoder:
        notes.append("t5_padding is for ELLA / RouWei-T5Gemma adapters and was ignored")
    return notes
