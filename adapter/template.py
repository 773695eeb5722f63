"""Prompt -> token ids, with the position of the user's own text inside the template.

The template (TemplateConfig, stored in the adapter file) governs training and inference alike,
so everything here is deterministic and depends only on the tokenizer, the template and the prompt.

Rendering
- Chat path (`use_chat_template`, and a chat template: the one recorded in the template, else the
  tokenizer's): the messages are an
  optional system turn (only when `system_prompt` is set) and one user turn holding
  `instruction + prompt`, rendered with `add_generation_prompt=False` (the adapter reads the
  prompt, nothing is generated) and `enable_thinking=False` (Qwen3's switch; it only ever changes
  the generation prompt, so it can never put text into the user's span). Templates that refuse a
  system turn (Gemma 2) get the system prompt at the head of the user turn followed by a blank
  line, which is what Gemma 3's own template does with one.
- Plain path (no chat template, or `use_chat_template` off): `instruction + prompt`, after the
  tokenizer's BOS id. A tokenizer without a BOS (Qwen) gets nothing in front when the instruction
  alone gives at least one token; otherwise the pad id (Qwen's `<|endoftext|>`, its document
  separator), or the EOS id if there is no pad, so that the empty prompt is never zero tokens.

The template is rendered once with a marker in place of the prompt; the prompt text is then put
where the marker was. That gives the exact character range of the prompt in the rendered string,
and templates that transform the message (`| trim`) cannot move it. Leading and trailing
whitespace of the prompt is stripped first on every path: a caption's stray newline must not change
the conditioning, and templates that trim would otherwise disagree with those that do not.

Finding the user's span: the rendered string is tokenized once with a fast tokenizer's offset
mapping, and the span is the run of tokens whose characters overlap the prompt's character range.
The span is found by scanning tokens, never by a fixed "skip the first N" count, so it holds for
any template and any instruction. (A token that straddles the boundary between the instruction and
the prompt counts as the prompt's; end instructions with whitespace or punctuation to avoid that.)

Too long: prompts whose own tokens exceed `max_tokens` are TRUNCATED (not chunked): the prompt
text is cut at the character where the first token over the budget starts, re-rendered, and the
dropped text is recorded with a warning the caller can show. We truncate because the adapter is
trained on captions of bounded length: chunks would be encoded without the context of the rest
of the prompt, and the resampler already sees every token of one sequence, so chunking would add
cost and a train/inference mismatch without a benefit. Cutting at a token's start character never
splits a character (byte-fallback tokens of one character share its offsets).

An empty prompt is the template with an empty user span, never zero tokens: it is exactly what the
trainer's condition dropout feeds. A1111-style (word:1.2) weights are not parsed here; the nodes
do that.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from .config import TemplateConfig
from .errors import AdapterError

__all__ = ["TemplateConfig", "PromptInfo", "TokenizedPrompts", "record_chat_template", "render_prompt",
           "plain_prefix_ids", "plain_start_id", "tokenize_prompts"]

# Private-use code points: no chat template writes or alters them, no real prompt contains them.
_MARKER = "\ue000llm-diff-adapter-prompt\ue001"
# How many times truncation re-cuts when re-tokenizing the shortened text merges differently.
_MAX_CUTS = 8
_SHOWN_DROPPED_CHARS = 200


@dataclass
class PromptInfo:
    """What became of one prompt (the nodes' `info` output shows it)."""

    num_tokens: int  # the whole sequence, template tokens included
    user_span: tuple[int, int]  # [start, end) token indices of the user's prompt
    prompt_tokens: int  # tokens of the prompt before truncation
    truncated_tokens: int = 0  # 0 when nothing was cut
    truncated_text: str = ""  # the text that was cut ("" if none)
    warnings: list[str] = field(default_factory=list)


@dataclass
class TokenizedPrompts:
    input_ids: torch.Tensor  # int64 [B, T], right-padded
    attention_mask: torch.Tensor  # int64 [B, T], 1 = real token
    infos: list[PromptInfo]


@dataclass
class _Rendered:
    """One rendered prompt: its ids and where the prompt's tokens are."""

    ids: list[int]
    span: tuple[int, int]
    offsets: list[tuple[int, int]]  # per id, characters of `text` (a prepended id gets (0, 0))
    prompt_start: int  # character range of the prompt in `text`
    prompt_end: int


def render_prompt(tokenizer, template: TemplateConfig, prompt: str) -> tuple[str, int, int, list[int]]:
    """The rendered text, the prompt's character range in it, and ids to put before the text's tokens."""
    prompt = prompt.strip()
    if template.use_chat_template and (template.chat_template or getattr(tokenizer, "chat_template", None)):
        before, after = _chat_frame(tokenizer, template)
        prefix_ids: list[int] = []  # the chat template writes its own BOS where the model expects one
    else:
        before, after = template.instruction, ""
        prefix_ids = plain_prefix_ids(tokenizer, template.instruction)
    return before + prompt + after, len(before), len(before) + len(prompt), prefix_ids


def _chat_frame(tokenizer, template: TemplateConfig) -> tuple[str, str]:
    """The rendered chat text before and after the prompt."""
    from jinja2 import TemplateError  # transformers renders chat templates with jinja2
    user = {"role": "user", "content": template.instruction + _MARKER}
    if template.system_prompt:
        messages = [{"role": "system", "content": template.system_prompt}, user]
        try:
            text = _apply(tokenizer, messages, template.chat_template)
        except TemplateError:  # the template's raise_exception(): it has no system role (Gemma 2)
            folded = template.system_prompt + "\n\n" + template.instruction + _MARKER
            text = _apply(tokenizer, [{"role": "user", "content": folded}], template.chat_template)
    else:
        text = _apply(tokenizer, [user], template.chat_template)
    if text.count(_MARKER) != 1:
        raise AdapterError(
            "the tokenizer's chat template does not copy the user's message into its output exactly once, so the "
            "prompt cannot be located; set use_chat_template = false in the adapter's template"
        )
    before, after = text.split(_MARKER)
    return before, after


def _apply(tokenizer, messages: list[dict], chat_template: str) -> str:
    return tokenizer.apply_chat_template(messages, chat_template=chat_template or None, tokenize=False,
                                         add_generation_prompt=False, enable_thinking=False)


def record_chat_template(template: TemplateConfig, tokenizer) -> TemplateConfig:
    """`template` with the chat template it renders with `tokenizer` written into it, for a new adapter.

    From then on the adapter renders the same tokens with any packaging of the same tokenizer (the
    fingerprint checks the vocabulary, not the chat template). A tokenizer without a chat template
    renders the plain path, so that is recorded as `use_chat_template = False`.
    """
    if not template.use_chat_template or template.chat_template:
        return template
    if not getattr(tokenizer, "chat_template", None):
        return dataclasses.replace(template, use_chat_template=False)
    return dataclasses.replace(template, chat_template=tokenizer.get_chat_template())


def plain_start_id(tokenizer) -> int | None:
    """The token a plain (no chat template) rendering may start with: BOS; without one pad, then EOS.

    The tokenizer fingerprint (fingerprint.py, version 2) hashes it, because it reaches the adapter."""
    for candidate in (getattr(tokenizer, "bos_token_id", None), getattr(tokenizer, "pad_token_id", None),
                      getattr(tokenizer, "eos_token_id", None)):
        if candidate is not None:
            return int(candidate)
    return None


def plain_prefix_ids(tokenizer, instruction: str) -> list[int]:
    """BOS; without one, a start token only when the empty prompt would otherwise be zero tokens."""
    if tokenizer.bos_token_id is not None:
        return [tokenizer.bos_token_id]
    if instruction and tokenizer(instruction, add_special_tokens=False)["input_ids"]:
        return []
    fallback = plain_start_id(tokenizer)
    if fallback is None:
        raise AdapterError("this tokenizer has no BOS, pad or EOS token, so an empty prompt would be zero tokens; "
                           "set a non-empty instruction in the adapter's template or use a chat template")
    return [fallback]


def _tokenize_one(tokenizer, template: TemplateConfig, prompt: str) -> _Rendered:
    text, start, end, prefix_ids = render_prompt(tokenizer, template, prompt)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(prefix_ids) + list(encoded["input_ids"])
    offsets = [(0, 0)] * len(prefix_ids) + [tuple(o) for o in encoded["offset_mapping"]]
    if not ids:
        raise AdapterError(f"the template produced zero tokens for the prompt {prompt!r}; set an instruction or "
                           "use a tokenizer with a BOS token")
    return _Rendered(ids, _find_span(offsets, start, end, len(prefix_ids)), offsets, start, end)


def _find_span(offsets: list[tuple[int, int]], start: int, end: int, first: int) -> tuple[int, int]:
    """[i, j) of the tokens overlapping characters [start, end); empty at the prompt's place when start == end."""
    if start == end:
        at = next((i for i in range(first, len(offsets)) if offsets[i][0] >= start), len(offsets))
        return at, at
    inside = [i for i in range(first, len(offsets)) if offsets[i][1] > start and offsets[i][0] < end]
    if not inside:
        raise AdapterError("no token of the rendered prompt covers the prompt's text; the tokenizer's offset "
                           "mapping is broken (use the model's fast tokenizer, tokenizer.json)")
    return inside[0], inside[-1] + 1


def _encode_prompt(tokenizer, template: TemplateConfig, prompt: str) -> tuple[list[int], PromptInfo]:
    prompt = prompt.strip()
    rendered = _tokenize_one(tokenizer, template, prompt)
    prompt_tokens = rendered.span[1] - rendered.span[0]
    kept = prompt
    for _ in range(_MAX_CUTS):
        span_start, span_end = rendered.span
        if span_end - span_start <= template.max_tokens:
            break
        # Cut where the first token over the budget starts (never inside a character).
        over = rendered.offsets[span_start + template.max_tokens][0]
        kept = kept[: max(0, over - rendered.prompt_start)].rstrip()
        rendered = _tokenize_one(tokenizer, template, kept)
    else:
        raise AdapterError(f"could not truncate the prompt to {template.max_tokens} tokens")
    info = PromptInfo(num_tokens=len(rendered.ids), user_span=rendered.span, prompt_tokens=prompt_tokens)
    if kept != prompt:
        dropped = prompt[len(kept):].strip()
        kept_tokens = rendered.span[1] - rendered.span[0]
        shown = dropped if len(dropped) <= _SHOWN_DROPPED_CHARS else dropped[:_SHOWN_DROPPED_CHARS] + "..."
        info.truncated_tokens = prompt_tokens - kept_tokens
        info.truncated_text = dropped
        info.warnings.append(f"prompt is {prompt_tokens} tokens; kept the first {kept_tokens}, dropped: '{shown}'")
    return rendered.ids, info


def tokenize_prompts(tokenizer, template: TemplateConfig, prompts: list[str]) -> TokenizedPrompts:
    """Render, tokenize and right-pad a batch of prompts; see the module docstring for the rules."""
    if isinstance(prompts, str):
        raise TypeError("tokenize_prompts takes a list of prompts, not a single string")
    if not prompts:
        raise ValueError("tokenize_prompts needs at least one prompt")
    if not getattr(tokenizer, "is_fast", False):
        raise AdapterError(f"{type(tokenizer).__name__} is a slow tokenizer without offset mappings, so the prompt "
                           "cannot be located; load the model's fast tokenizer (tokenizer.json)")
    template.validate()
    encoded = [_encode_prompt(tokenizer, template, prompt) for prompt in prompts]
    length = max(len(ids) for ids, _ in encoded)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0  # masked out, any id will do
    input_ids = torch.full((len(prompts), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), length), dtype=torch.long)
    for row, (ids, _) in enumerate(encoded):
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, : len(ids)] = 1
    return TokenizedPrompts(input_ids, attention_mask, [info for _, info in encoded])
