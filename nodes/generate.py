"""Enhance prompt's work: the LLM writes a caption (adapter/generate.py) under ComfyUI's memory management,
progress bar and Cancel button."""
from __future__ import annotations

import comfy.model_management as mm
import comfy.utils

from .handles import LLMHandle
from .memory import generate_working_memory, llm_on_device, llm_shape


def generate_text(llm: LLMHandle, text: str, instruction: str, *, max_new_tokens: int, seed: int, temperature: float,
                  top_p: float) -> str:
    """The LLM's answer to `instruction` about `text` (one user turn), sampled with `seed`."""
    from ..adapter.generate import GenerationSettings, build_generation_prompt, enhance_prompt, generation_head

    settings = GenerationSettings(max_new_tokens=max_new_tokens, seed=seed, temperature=temperature, top_p=top_p)
    head = generation_head(llm.loaded)  # before loading anything: an LLM without one fails at once
    prompt_tokens = len(build_generation_prompt(llm.loaded.tokenizer, instruction, text))
    # An untied head is brought to the device for the call; a tied one is the embedding, already there
    # unless ComfyUI loaded the model partially (then a copy, at most in fp32, is made).
    head_bytes = head.weight.numel() * 4 if llm.partial_load else 0 if head.tied else head.nbytes
    memory = generate_working_memory(llm_shape(llm), prompt_tokens + max_new_tokens, head_bytes)
    progress = comfy.utils.ProgressBar(max_new_tokens)

    def on_token(step: int) -> None:
        progress.update_absolute(step + 1)
        mm.throw_exception_if_processing_interrupted()

    with llm_on_device(llm, memory_required=memory):
        result = enhance_prompt(llm.loaded, text, instruction, settings, head=head, on_token=on_token)
    progress.update_absolute(max_new_tokens)
    return result
