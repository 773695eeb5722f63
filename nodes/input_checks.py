"""Inputs that pass ComfyUI's own checks but break a node: lone surrogates in text, NaN or infinite numbers.

A browser keeps an unpaired UTF-16 surrogate in `JSON.stringify` output and Python's JSON decoder keeps it
as a code point, but no tokenizer can encode it (it has no UTF-8 form). A NaN passes ComfyUI's min/max
check (every comparison with NaN is false) and turns the conditioning into NaN: a black image reported
as success. Both reach a node only through the HTTP API.
"""
from __future__ import annotations

import math

REPLACEMENT = "\ufffd"


def _is_surrogate(char: str) -> bool:
    return 0xD800 <= ord(char) <= 0xDFFF


def sanitize_text(text: str, name: str) -> tuple[str, str | None]:
    """(text with lone surrogates replaced by U+FFFD, a note saying where, or None when nothing changed)."""
    positions = [i for i, char in enumerate(text) if _is_surrogate(char)]
    if not positions:
        return text, None
    clean = "".join(REPLACEMENT if _is_surrogate(char) else char for char in text)
    shown = ", ".join(map(str, positions[:10])) + (" ..." if len(positions) > 10 else "")
    return clean, (f"{len(positions)} invalid character(s) in {name} (unpaired UTF-16 surrogates, at character "
                   f"position {shown}) were replaced with U+FFFD")


def check_finite(node: str, **values: float) -> None:
    """Refuse NaN and infinite numeric inputs, naming the input."""
    for name, value in values.items():
        if value is not None and not math.isfinite(value):
            raise ValueError(f"{node}: {name} is {value}, not a finite number; set it to a number in its range "
                             "(a NaN or infinite value passes ComfyUI's range check but gives a black image).")
