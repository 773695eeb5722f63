"""Tokenizer fingerprints: equal across packagings of one tokenizer, different across tokenizers, stable over time."""
from __future__ import annotations

import re

import pytest
from transformers import AutoTokenizer

from adapter.fingerprint import tokenizer_fingerprint
from support.tiny_models import FAMILIES, make_tiny_llm, other_tokenizer_packaging, tiny_tokenizer


class CodepointTokenizer:
    """A duck-typed tokenizer (one id per code point) whose every field the test can change."""

    def __init__(self, size=0x110000, bos=1, eos=2, unk=0, pad=3, shift=0):
        self.size, self.bos_token_id, self.eos_token_id, self.unk_token_id, self.pad_token_id = size, bos, eos, unk, pad
        self.shift = shift

    def __len__(self):
        return self.size

    def encode(self, text, add_special_tokens=True):
        assert add_special_tokens is False, "probes must be encoded without special tokens"
        return [ord(c) + (self.shift if c == "猫" else 0) for c in text]


# Pins the version-1 record (fields, probe texts, JSON canonicalisation). If this fails, existing
# adapter files would stop validating: add a version 2 instead of editing version 1.
GOLDEN_V1 = "tokfp1:0e2a3d9b37e085e3488f7810be208471030fb71428ad5520d2508255918daa5c"


def test_format_and_golden_value():
    fingerprint = tokenizer_fingerprint(CodepointTokenizer())
    assert re.fullmatch(r"tokfp1:[0-9a-f]{64}", fingerprint)
    assert fingerprint == GOLDEN_V1


@pytest.mark.parametrize(
    "changed",
    [dict(size=0x110001), dict(bos=None), dict(bos=5), dict(eos=7), dict(unk=None), dict(shift=1)],
    ids=["vocab_size", "no_bos", "bos", "eos", "no_unk", "probe_ids"],
)
def test_every_field_counts(changed):
    assert tokenizer_fingerprint(CodepointTokenizer(**changed)) != GOLDEN_V1


def test_pad_does_not_count():
    """Packagings often differ only in the pad token, which is masked out anyway."""
    assert tokenizer_fingerprint(CodepointTokenizer(pad=None)) == GOLDEN_V1
    assert tokenizer_fingerprint(CodepointTokenizer(pad=99)) == GOLDEN_V1


@pytest.mark.parametrize("family", FAMILIES)
def test_two_packagings_of_one_tokenizer_agree(family):
    folder = make_tiny_llm(family=family)
    saved = tiny_tokenizer(family)
    other = other_tokenizer_packaging(folder, family)
    assert tokenizer_fingerprint(saved) == tokenizer_fingerprint(other)
    if family == "llama":  # ComfyUI's packaging adds <pad>, Meta's has none: the pad must not count
        assert saved.pad_token_id is not None and other.pad_token_id is None


def test_different_tokenizers_differ():
    fingerprints = {
        family: tokenizer_fingerprint(tiny_tokenizer(family))
        for family in ("qwen2", "llama", "llama2", "gemma2")
    }
    assert len(set(fingerprints.values())) == 4, fingerprints


def test_an_added_token_changes_the_fingerprint():
    tokenizer = AutoTokenizer.from_pretrained(make_tiny_llm(family="gemma2"))
    before = tokenizer_fingerprint(tokenizer)
    tokenizer.add_tokens(["<extra_style_token>"])
    assert tokenizer_fingerprint(tokenizer) != before
