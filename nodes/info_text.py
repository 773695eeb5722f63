"""The text of the encode node's `info` output: what the LLM saw and what was cut or ignored."""
from __future__ import annotations


def describe_encoding(*, llm_name: str, llm_info, adapter_name: str, config, prompt_info, notes: list[str]) -> str:
    """A Markdown list, one item per line: Preview Any renders Markdown, where plain lines would run together
    into one paragraph. `prompt_info` is adapter.PromptInfo, `notes` the node's own remarks."""
    target = config.target
    lines = [
        f"LLM: {llm_name} ({llm_info.model_type}, {llm_info.num_layers} layers, hidden {llm_info.hidden_size})",
        f"adapter: {adapter_name} -> {target.family}, {target.num_tokens} tokens x {target.context_dim}"
        + (f", pooled {target.pooled_dim}" if target.pooled_dim else ""),
        f"prompt: {prompt_info.prompt_tokens - prompt_info.truncated_tokens} of {config.template.max_tokens} tokens used "
        f"({prompt_info.num_tokens} with the template)",
    ]
    if prompt_info.truncated_tokens:
        cut = prompt_info.truncated_text
        shown = cut if len(cut) <= 200 else cut[:200] + "..."
        lines.append(f"truncated: {prompt_info.truncated_tokens} tokens over the budget were dropped: {shown!r}")
    lines.extend(f"warning: {w}" for w in prompt_info.warnings)
    lines.extend(f"note: {n}" for n in notes)
    return "\n".join(f"{ITEM}{line}" for line in lines)


def describe_foreign(*, llm_name: str, llm_info, adapter_name: str, config, side, prompt_info, notes: list[str]) -> str:
    """The `info` of a published adapter (adapter.foreign.ForeignConfig) and its text side."""
    target = config.target
    lines = [
        f"LLM: {llm_name} ({llm_info.model_type}, {llm_info.num_layers} layers, hidden {llm_info.hidden_size})",
        f"adapter: {adapter_name} = {config.preset} ({config.kind}, layout {config.layout}) -> {target.family}, "
        f"{target.num_tokens} tokens x {target.context_dim}" + (f", pooled {target.pooled_dim}" if target.pooled_dim else ""),
        f"text side: {side.describe()}",
        f"prompt: {prompt_info.tokens} of {side.max_length} tokens used",
    ]
    if prompt_info.dropped:
        lines.append(f"truncated: {prompt_info.dropped} tokens over {side.max_length} were dropped")
    if side.encoder in ("gemma_chat", "any") and prompt_info.prefix_tokens and prompt_info.prefix_tokens != side.skip_first:
        lines.append(f"warning: with this tokenizer and system prompt the template puts {prompt_info.prefix_tokens} tokens "
                     f"before the prompt, but skip_first is {side.skip_first}: "
                     + ("template tokens reach the adapter" if prompt_info.prefix_tokens > side.skip_first
                        else "the start of the prompt is cut"))
    lines.extend(f"note: {n}" for n in notes)
    return "\n".join(f"{ITEM}{line}" for line in lines)


ITEM = "- "  # a Markdown list item; strip it to read a line's plain text
