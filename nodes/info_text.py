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


ITEM = "- "  # a Markdown list item; strip it to read a line's plain text
