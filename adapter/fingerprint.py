"""A tokenizer's fingerprint: the same ids for the same text, whatever the packaging.

An adapter is trained on the token ids one tokenizer produces. The fingerprint lets a loader check
that the tokenizer at hand maps text to the same ids, whether it came from a Hugging Face folder
(tokenizer.json), vocab.json + merges.txt, a SentencePiece tokenizer.model, or another loader's
copy (ComfyUI's). It is a hash over behaviour, not over files.

Version 2 (written into new adapters) hashes only what can reach the adapter:
- the ids of a fixed list of probe texts encoded with `add_special_tokens=False` (ordinary text in
  many scripts, numbers, code, and the chat markers of the common families);
- the token a plain prompt starts with (template.plain_start_id: BOS, else pad, else EOS).

Version 1 also hashed the vocabulary size and the BOS, EOS and UNK ids. That refused packagings of
one tokenizer that encode every text identically: ComfyUI's Qwen 2.5 copy adds four tokens
(<|img|>, <|endofimg|>, <|meta|>, <|endofmeta|>: 151,669 instead of 151,665) and names <|im_end|>
as EOS, which Qwen's base folders do not; its Llama 3 copy adds <unk>, <image> and <pad> and an UNK
id Meta's has none of. Unused added tokens change no id the adapter sees, so version 2 leaves them
out; a token that does change how text splits shows up in the probes.

The PAD id is left out of both except as the plain start token when there is no BOS: packagings
often differ only in it, and padded positions are masked out. Chat templates are left out: the
template the adapter renders with is stored in the adapter itself (TemplateConfig.chat_template).

Never edit a version: add the next one (keep the old ones computable) so that existing adapter
files still validate: file_format.check_llm_matches compares at the version the adapter recorded.
"""
from __future__ import annotations

import hashlib
import json

from .template import plain_start_id

__all__ = ["FINGERPRINT_PREFIX", "FINGERPRINT_VERSION", "PROBE_TEXTS", "PROBE_TEXTS_V2", "fingerprint_version",
           "tokenizer_fingerprint"]

FINGERPRINT_VERSION = 2  # what new adapters record
FINGERPRINT_PREFIX = f"tokfp{FINGERPRINT_VERSION}:"

# Version 1 probes (version 2 hashes them too). NEVER edit.
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

# Added in version 2: the markers chat templates put around a prompt (Qwen / ChatML, Llama 3, Gemma,
# Llama 2 / Mistral), so a copy that does not treat one as a single special token is told apart.
# NEVER edit: add a version 3 instead.
PROBE_TEXTS_V2: tuple[str, ...] = PROBE_TEXTS + (
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|endoftext|>",
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|><|end_of_text|>",
    "<bos><start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n<eos>",
    "<s>[INST] hi [/INST]</s>",
)


def _ids(tokenizer, text: str) -> list[int]:
    return [int(i) for i in tokenizer.encode(text, add_special_tokens=False)]


def _optional_id(value) -> int | None:
    return None if value is None else int(value)


def _record_v1(tokenizer) -> dict:
    return {
        "version": 1,
        "vocab_size": len(tokenizer),
        "bos": _optional_id(getattr(tokenizer, "bos_token_id", None)),
        "eos": _optional_id(getattr(tokenizer, "eos_token_id", None)),
        "unk": _optional_id(getattr(tokenizer, "unk_token_id", None)),
        "probes": [_ids(tokenizer, text) for text in PROBE_TEXTS],
    }


def _record_v2(tokenizer) -> dict:
    return {
        "version": 2,
        "plain_start": plain_start_id(tokenizer),
        "probes": [_ids(tokenizer, text) for text in PROBE_TEXTS_V2],
    }


_RECORDS = {1: _record_v1, 2: _record_v2}


def fingerprint_version(fingerprint: str) -> int | None:
    """The version of a "tokfp<N>:<hex>" fingerprint, or None when it is not one this code can compute."""
    head, sep, _ = fingerprint.partition(":")
    if sep and head.startswith("tokfp") and head[5:].isdigit() and int(head[5:]) in _RECORDS:
        return int(head[5:])
    return None


def tokenizer_fingerprint(tokenizer, version: int = FINGERPRINT_VERSION) -> str:
    """"tokfp<version>:" + sha256 hex of the canonical JSON of that version's fields (see above).

    Works for any tokenizer with `encode(text, add_special_tokens=False)` and `bos_token_id` /
    `pad_token_id` / `eos_token_id` attributes (missing ones count as None); version 1 also needs
    `len()` and `unk_token_id`.
    """
    if version not in _RECORDS:
        raise ValueError(f"unknown tokenizer fingerprint version {version}; known: {sorted(_RECORDS)}")
    canonical = json.dumps(_RECORDS[version](tokenizer), sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return f"tokfp{version}:" + hashlib.sha256(canonical.encode("ascii")).hexdigest()
