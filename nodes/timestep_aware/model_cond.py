"""The `model_conds` contract of a timestep-aware adapter's conditioning (see docs/internals.md).

LLMDiffTextEncode with a timestep-aware adapter adds one key to the conditioning entry's extras:

    [[context, {..., "model_conds": {STATES_KEY: StepStatesCond(adapter.timestep_contexts.StepStates)}}]]

`context` stays what it always was (the adapter at the fallback timestep, times llm_strength, plus
CLIP's tokens in concat mode), so every core node and a sampler without LLMDiffApplyAdapter work as
before. ComfyUI copies `model_conds` from the extras into every sampling entry
(comfy.sampler_helpers.convert_cond), where the Apply node's wrapper (wrapper.py) reads it.

Without the wrapper the key travels to the UNet like any model cond: `get_area_and_mult` calls
`process_cond`, batching asks `can_concat`, `cond_cat` calls `concat`, and the result reaches
`BaseModel.apply_model` as a keyword argument that the SD1.5/SD2/SDXL UNet (UNetModel.forward's
**kwargs) ignores. Two details of ComfyUI shape that path:
- entries batch into one UNet call only if they carry the same model_conds keys and every pair can
  concat: our states are padded to the adapter's fixed length, so a positive and a negative of the
  same adapter batch; a CLIP-encoded negative (no such key) does not batch with our positive, which
  costs a second UNet call per step (the Apply node's wrapper removes the key, so with it they batch);
- `concat` must not return a list: BaseModel._apply_model would call `.to()` on each item.
"""
from __future__ import annotations

import logging

import comfy.conds

from ...adapter.timestep_contexts import StepStates, state_length

log = logging.getLogger(__name__)

STATES_KEY = "llmdiff_step_states"


class StepStatesCond(comfy.conds.CONDRegular):
    """The model cond of one entry: its StepStates."""

    def __init__(self, cond: StepStates):
        self.cond = cond

    def process_cond(self, batch_size, **kwargs):
        # One per entry, not repeated per latent: nothing reads it per sample, and repeating the
        # states (megabytes) for every image of a batch would only cost memory.
        return self

    def can_concat(self, other) -> bool:
        if not isinstance(other, StepStatesCond):
            return False
        mine, theirs = self.cond, other.cond
        return (mine.mask.shape == theirs.mask.shape and mine.encoded.queries.shape == theirs.encoded.queries.shape
                and mine.mask.device == theirs.mask.device)

    def concat(self, others):
        # The batch's StepStates in order, as a tuple (not a list, see the module doc): nothing on
        # this path reads them, so their tensors are not copied into one batch.
        return (self.cond, *(other.cond for other in others))

    def size(self):
        return list(self.cond.mask.shape)


def attach_step_states(conditioning: list, encoding, adapter, llm, llm_strength: float) -> list:
    """Add the entry's StepStates to `conditioning` (one entry, as build_conditioning made it)."""
    from ...adapter import tokenize_prompts

    from ...adapter.foreign import is_foreign

    if is_foreign(adapter.config):  # ELLA: T5 states, no template around them; the budget is the text side's length
        length = adapter.config.text.max_length
    else:
        template = adapter.config.template
        # The template's own tokens: the empty prompt is the template with an empty user span.
        template_tokens = tokenize_prompts(llm.loaded.tokenizer, template, [""]).infos[0].num_tokens
        length = state_length(template_tokens, template.max_tokens)
    context, extras = conditioning[0]
    states = StepStates.build(
        encoding.states, encoding.mask, length, strength=float(llm_strength), context=context,
        num_tokens=adapter.config.target.num_tokens, adapter_id=adapter.identity, adapter_name=adapter.name,
    )
    if states.mask.shape[1] != length:
        log.warning("LLM Diff Text Encode: this prompt took %d tokens with the template, over the fixed %d; without "
                    "Apply LLM Diff Adapter it will not batch with other prompts in one UNet call", states.tokens, length)
    extras = dict(extras, model_conds={**extras.get("model_conds", {}), STATES_KEY: StepStatesCond(states)})
    return [[context, extras]]

