"""Tokenizer fingerprints: equal across packagings of one tokenizer, different across tokenizers, stable over time."""
from __future__ import annotations

import json
import re
import shutil

import pytest
from transformers import AutoTokenizer

from adapter import AdapterConfig, AdapterMismatchError, LLMInfo, check_llm_matches
from adapter.config import TARGETS
from adapter.fingerprint import fingerprint_version, tokenizer_fingerprint
from devkit.cache import comfy_tokenizer_dir
from devkit.tiny_models import FAMILIES, make_tiny_llm, other_tokenizer_packaging, tiny_tokenizer


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


# Pin each version's record (fields, probe texts, JSON canonicalisation). If one fails, existing
# adapter files would stop validating: add the next version instead of editing one.
GOLDEN_V1 = "tokfp1:0e2a3d9b37e085e3488f7810be208471030fb71428ad5520d2508255918daa5c"
GOLDEN_V2 = "tokfp2:fb9458c7058b8c5005c91506733ae487ef0ef4f3ab950bd6da64dd0f32710708"


def test_format_and_golden_values():
    assert re.fullmatch(r"tokfp1:[0-9a-f]{64}", tokenizer_fingerprint(CodepointTokenizer(), version=1))
    assert tokenizer_fingerprint(CodepointTokenizer(), version=1) == GOLDEN_V1
    assert tokenizer_fingerprint(CodepointTokenizer()) == GOLDEN_V2  # new adapters record version 2
    assert fingerprint_version(GOLDEN_V1) == 1 and fingerprint_version(GOLDEN_V2) == 2
    assert fingerprint_version("tokfp9:abc") is None and fingerprint_version("sha256:abc") is None
    with pytest.raises(ValueError, match="unknown tokenizer fingerprint version 9"):
        tokenizer_fingerprint(CodepointTokenizer(), version=9)


@pytest.mark.parametrize(
    "changed",
    [dict(size=0x110001), dict(bos=None), dict(bos=5), dict(eos=7), dict(unk=None), dict(shift=1)],
    ids=["vocab_size", "no_bos", "bos", "eos", "no_unk", "probe_ids"],
)
def test_every_version_1_field_counts(changed):
    assert tokenizer_fingerprint(CodepointTokenizer(**changed), version=1) != GOLDEN_V1


@pytest.mark.parametrize("changed", [dict(bos=5), dict(bos=None), dict(shift=1)], ids=["bos", "no_bos", "probe_ids"])
def test_version_2_counts_what_reaches_the_adapter(changed):
    """The token a plain prompt starts with, and the ids of text."""
    assert tokenizer_fingerprint(CodepointTokenizer(**changed)) != GOLDEN_V2


@pytest.mark.parametrize("changed", [dict(size=0x110001), dict(eos=7), dict(unk=None), dict(pad=None), dict(pad=99)],
                         ids=["vocab_size", "eos", "no_unk", "no_pad", "pad"])
def test_version_2_ignores_what_never_reaches_the_adapter(changed):
    """With a BOS, neither EOS, UNK, pad nor unused extra tokens change an id the adapter sees."""
    assert tokenizer_fingerprint(CodepointTokenizer(**changed)) == GOLDEN_V2


def test_version_2_without_bos_counts_the_start_token():
    """Without a BOS the plain template starts an empty prompt with pad (else EOS), so that id counts."""
    no_bos = tokenizer_fingerprint(CodepointTokenizer(bos=None))
    assert tokenizer_fingerprint(CodepointTokenizer(bos=None, pad=99)) != no_bos
    assert tokenizer_fingerprint(CodepointTokenizer(bos=None, pad=None)) != no_bos  # falls back to EOS 2


def test_pad_does_not_count_in_version_1():
    """Packagings often differ only in the pad token, which is masked out anyway."""
    assert tokenizer_fingerprint(CodepointTokenizer(pad=None), version=1) == GOLDEN_V1
    assert tokenizer_fingerprint(CodepointTokenizer(pad=99), version=1) == GOLDEN_V1


@pytest.mark.parametrize("family", FAMILIES)
def test_two_packagings_of_one_tokenizer_agree(family):
    folder = make_tiny_llm(family=family)
    saved = tiny_tokenizer(family)
    other = other_tokenizer_packaging(folder, family)
    assert tokenizer_fingerprint(saved) == tokenizer_fingerprint(other)
    assert tokenizer_fingerprint(saved, version=1) == tokenizer_fingerprint(other, version=1)
    if family == "llama":  # ComfyUI's packaging adds <pad>, Meta's has none: the pad must not count
        assert saved.pad_token_id is not None and other.pad_token_id is None


def test_different_tokenizers_differ():
    fingerprints = {
        family: tokenizer_fingerprint(tiny_tokenizer(family))
        for family in ("qwen2", "llama", "llama2", "gemma2")
    }
    assert len(set(fingerprints.values())) == 4, fingerprints


def test_an_added_token_counts_when_it_changes_how_text_splits():
    tokenizer = AutoTokenizer.from_pretrained(make_tiny_llm(family="gemma2"))
    before = tokenizer_fingerprint(tokenizer)
    tokenizer.add_tokens(["<extra_style_token>"])  # in no text the adapter sees: the ids are unchanged
    assert tokenizer_fingerprint(tokenizer) == before
    assert tokenizer_fingerprint(tokenizer, version=1) != tokenizer_fingerprint(tiny_tokenizer("gemma2"), version=1)
    tokenizer.add_tokens(["red chair"])  # "a photo of a cat sitting on a red chair" now splits differently
    assert tokenizer_fingerprint(tokenizer) != before


# ComfyUI's tokenizer copies against the releases they were made from. Only the tokenizer files
# ComfyUI ships are here (no hub access), so each release is rebuilt from ComfyUI's copy by undoing
# the documented differences: Qwen 2.5's copy adds <|img|>, <|endofimg|>, <|meta|>, <|endofmeta|>
# (151,669 tokens, the release has 151,665) and Qwen's base release names <|endoftext|> as EOS
# where the copy names <|im_end|>; Llama 3's copy adds <unk>, <image>, <pad> (Meta's has 128,256
# tokens, no UNK and no pad).
COMFY_EXTRAS = {
    "qwen25_tokenizer": ({"<|img|>", "<|endofimg|>", "<|meta|>", "<|endofmeta|>"}, {"eos_token": "<|endoftext|>"}),
    "llama_tokenizer": ({"<unk>", "<image>", "<pad>"}, {"unk_token": None, "pad_token": None}),
}


def release_from_comfy_copy(name: str, dest):
    extras, config_changes = COMFY_EXTRAS[name]
    shutil.copytree(comfy_tokenizer_dir(name), dest)
    config = json.loads((dest / "tokenizer_config.json").read_text(encoding="utf-8"))
    config["added_tokens_decoder"] = {k: v for k, v in config["added_tokens_decoder"].items() if v["content"] not in extras}
    config.update(config_changes)
    (dest / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    if (dest / "tokenizer.json").is_file():
        data = json.loads((dest / "tokenizer.json").read_text(encoding="utf-8"))
        data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] not in extras]
        (dest / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    return AutoTokenizer.from_pretrained(dest)


@pytest.mark.parametrize("name, sizes", [("qwen25_tokenizer", (151669, 151665)), ("llama_tokenizer", (128259, 128256))])
def test_comfyui_copies_match_the_releases_at_version_2(name, sizes, tmp_path):
    comfy = AutoTokenizer.from_pretrained(comfy_tokenizer_dir(name))
    release = release_from_comfy_copy(name, tmp_path / name)
    assert (len(comfy), len(release)) == sizes
    assert tokenizer_fingerprint(comfy, version=1) != tokenizer_fingerprint(release, version=1)  # why version 2 exists
    assert tokenizer_fingerprint(comfy) == tokenizer_fingerprint(release)


def _config_with(fingerprint: str) -> AdapterConfig:
    return AdapterConfig(llm=LLMInfo("Qwen2ForCausalLM", "qwen2", 32, 3, fingerprint), target=TARGETS["sd15"])


def test_an_adapter_with_a_version_1_fingerprint_still_validates():
    """Checked at the version it recorded, against the tokenizer at hand."""
    tokenizer = tiny_tokenizer("qwen2")
    info = LLMInfo("Qwen2ForCausalLM", "qwen2", 32, 3, tokenizer_fingerprint(tokenizer))
    check_llm_matches(_config_with(tokenizer_fingerprint(tokenizer, version=1)), info, tokenizer)
    with pytest.raises(AdapterMismatchError, match="tokenizer tokfp1:"):
        check_llm_matches(_config_with(tokenizer_fingerprint(tokenizer, version=1)), info)  # no tokenizer to check with
    other = tiny_tokenizer("llama")
    with pytest.raises(AdapterMismatchError, match=r"version-1 fingerprint, which also counts the vocabulary size"):
        check_llm_matches(_config_with(tokenizer_fingerprint(other, version=1)), info, tokenizer)
    with pytest.raises(AdapterMismatchError, match="tokenizer tokfp2:"):
        check_llm_matches(_config_with(tokenizer_fingerprint(other)), info, tokenizer)
