"""Remove A1111-style emphasis, `(word:1.2)`, `(word)` and `\\(` escapes, from the text the LLM reads.

CLIP honours these weights; an LLM would read the brackets and numbers as words. We parse with
ComfyUI's own CLIP prompt parser (comfy.sd1_clip), so the LLM sees exactly the words CLIP
weights, with no second parser to drift from it.
"""
from __future__ import annotations


def strip_prompt_weights(text: str) -> tuple[str, bool]:
    """(text without weight syntax, whether anything was removed)."""
    if "(" not in text and ")" not in text:
        return text, False  # the common case; nothing to parse
    from comfy.sd1_clip import escape_important, token_weights, unescape_important  # loaded by ComfyUI already

    pieces = token_weights(escape_important(text), 1.0)
    plain = unescape_important("".join(piece for piece, _weight in pieces))
    return plain, plain != text
