"""A tokenizer's fingerprint: the same ids for the same text, whatever the packaging.

An adapter is trained on the token ids one tokenizer produces. The fingerprint lets a loader check
that the tokenizer at hand maps text to the same ids, whether it came from a Hugging Face folder
(tokenizer.json), vocab.json + merges.txt, a SentencePiece tokenizer.model, or another loader's
copy (ComfyUI's). It is a hash over behaviour, not over files:

- the vocabulary size, `len(tokenizer)` (base vocabulary plus added tokens);
- the BOS, EOS and UNK ids (None where absent): BOS starts the plain-text template, EOS/UNK can
  appear in the ids the LLM sees;
- the ids of a fixed, versioned list of probe texts encoded with `add_special_tokens=False`.

The PAD id is deliberately left out: packagings of one tokenizer often differ only in it (Meta's
Llama 3 has none, ComfyUI's copy adds `<pad>`, Qwen's base and instruct folders disagree), and
padded positions are masked out, so it never changes what the adapter sees. Chat templates are
left out too: the template the adapter uses is stored in the adapter itself.

Changing the probes or the fields changes every fingerprint: do it only by adding a new version
(keep the old one computable) so existing adapter files still validate.
"""
from __future__ import annotations

import hashlib
import json

__all__ = ["FINGERPRINT_PREFIX", "PROBE_TEXTS", "tokenizer_fingerprint"]

FINGERPRINT_VERSION = 1
FINGERPRINT_PREFIX = "tokfp1:"

# Version 1 probes. NEVER edit: add PROBE_TEXTS_V2 and a version 2 instead.
PROBE_TEXTS: tuple[str, ...] = (
    "a photo of a cat sitting on a red chair",
    "A Portrait Of An Old Man, Oil Painting, Highly Detailed, 8K",
    "The quick brown fox jumps over the lazy dog.",
    "0 1 12 123 1234 12345 3.14159 -42 1,000,000 2024-06-01 10:30",
    "Hello, world! (yes) [no] {maybe} <tag> \"quoted\" 'single' ; : ... ?! @#$%^&*_+=|\\/~`",
    "一只猫坐在红色的椅子上",
    "東京の夜景、ネオン、雨",
    "고양이 사진",
    "Привет, мир. Ünïcödé àccénts: café naïve façade",
    "emoji: 🐱🐶🌸 👩‍👩‍👧 🏳️‍🌈 ❤️",
    "  leading and trailing spaces  ",
    "tabs\tand\nnew\n\nlines   and    runs",
    "def f(x):\n    return {'a': [x ** 2 for x in range(10)]}  # code",
    "<|im_start|> <s> </s> <bos> <eos> [INST] <start_of_turn>",
)


def _ids(tokenizer, text: str) -> list[int]:
    return [int(i) for i in tokenizer.encode(text, add_special_tokens=False)]


def _optional_id(value) -> int | None:
    return None if value is None else int(value)


def tokenizer_fingerprint(tokenizer) -> str:
    """"tokfp1:" + sha256 hex of the canonical JSON of the fields above.

    Works for any tokenizer with `encode(text, add_special_tokens=False)`, `len()` and
    `bos_token_id` / `eos_token_id` / `unk_token_id` attributes (missing attributes count as None).
    """
    record = {
        "version": FINGERPRINT_VERSION,
        "vocab_size": len(tokenizer),
        "bos": _optional_id(getattr(tokenizer, "bos_token_id", None)),
        "eos": _optional_id(getattr(tokenizer, "eos_token_id", None)),
        "unk": _optional_id(getattr(tokenizer, "unk_token_id", None)),
        "probes": [_ids(tokenizer, text) for text in PROBE_TEXTS],
    }
    canonical = json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return FINGERPRINT_PREFIX + hashlib.sha256(canonical.encode("ascii")).hexdigest()
