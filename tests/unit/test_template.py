"""Prompt templates: the user's span is found by scanning tokens, for every family's real tokenizer."""
from __future__ import annotations

import pytest
import torch

from adapter.config import TemplateConfig
from adapter.errors import AdapterError, ConfigError
from adapter.template import tokenize_prompts
from devkit.tiny_models import FAMILIES, tiny_tokenizer

PROMPTS = ["a red cat sitting on a chair", "一只猫, 东京の夜景", "emoji 🐱🌸 and 3.14 (x)", "cat"]


tokenizer = tiny_tokenizer  # cached per process; never mutated here


def span_text(tok, tokens, row: int) -> str:
    start, end = tokens.infos[row].user_span
    return tok.decode(tokens.input_ids[row, start:end])


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("instruction", ["", "Describe the image:\n"])
def test_span_decodes_to_the_prompt(family, instruction):
    tok = tokenizer(family)
    tokens = tokenize_prompts(tok, TemplateConfig(instruction=instruction), PROMPTS)
    for row, prompt in enumerate(PROMPTS):
        info = tokens.infos[row]
        assert span_text(tok, tokens, row) == prompt
        assert info.prompt_tokens == info.user_span[1] - info.user_span[0] > 0
        assert info.truncated_tokens == 0 and info.warnings == []
    # The template's own tokens lie outside the span: the start depends on the instruction, not a fixed count.
    if instruction:
        plain = tokenize_prompts(tok, TemplateConfig(), PROMPTS[:1]).infos[0].user_span[0]
        assert tokens.infos[0].user_span[0] > plain


@pytest.mark.parametrize("family", FAMILIES)
def test_empty_prompt_is_the_template_with_an_empty_span(family):
    tok = tokenizer(family)
    template = TemplateConfig(instruction="Describe:\n")
    tokens = tokenize_prompts(tok, template, ["", "   ", "cat"])
    empty, blank, cat = tokens.infos
    assert empty.num_tokens >= 1 and empty.user_span[0] == empty.user_span[1] and empty.prompt_tokens == 0
    assert blank == empty  # surrounding whitespace is stripped on every path
    # The empty span sits exactly where the prompt's tokens start, and the template around it is unchanged.
    assert empty.user_span[0] == cat.user_span[0]
    start = cat.user_span[0]
    assert torch.equal(tokens.input_ids[0, :start], tokens.input_ids[2, :start])
    tail = empty.num_tokens - start
    assert torch.equal(tokens.input_ids[0, start:empty.num_tokens], tokens.input_ids[2, cat.user_span[1]:cat.user_span[1] + tail])


def test_empty_prompt_without_bos_gets_one_start_token():
    """Qwen has no BOS: plain text starts with its pad (<|endoftext|>) only when nothing else would be there."""
    tok = tokenizer("qwen2")
    plain = TemplateConfig(use_chat_template=False)
    tokens = tokenize_prompts(tok, plain, ["", "cat"])
    assert tokens.infos[0].num_tokens == 1 and tokens.input_ids[0, 0].item() == tok.pad_token_id
    assert tokens.input_ids[1, 0].item() == tok.pad_token_id and span_text(tok, tokens, 1) == "cat"
    with_instruction = tokenize_prompts(tok, TemplateConfig(use_chat_template=False, instruction="Describe:\n"), [""])
    assert tok.decode(with_instruction.input_ids[0]) == "Describe:\n"


@pytest.mark.parametrize("family", ["llama", "llama2", "gemma2"])
def test_plain_path_starts_with_bos(family):
    tok = tokenizer(family)
    tokens = tokenize_prompts(tok, TemplateConfig(use_chat_template=False), ["a red cat", ""])
    assert tokens.input_ids[0, 0].item() == tok.bos_token_id
    assert tokens.infos[0].user_span[0] == 1 and span_text(tok, tokens, 0) == "a red cat"
    assert tokens.infos[1].num_tokens == 1  # just the BOS


def test_llama2_has_no_chat_template_and_takes_the_plain_path():
    tok = tokenizer("llama2")
    assert not tok.chat_template
    chat = tokenize_prompts(tok, TemplateConfig(use_chat_template=True), ["a red cat"])
    plain = tokenize_prompts(tok, TemplateConfig(use_chat_template=False), ["a red cat"])
    assert torch.equal(chat.input_ids, plain.input_ids)


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "llama", "gemma3"])
def test_system_prompt_goes_before_the_span(family):
    tok = tokenizer(family)
    system = "You draw pictures."
    tokens = tokenize_prompts(tok, TemplateConfig(system_prompt=system), ["a red cat"])
    start, end = tokens.infos[0].user_span
    assert system in tok.decode(tokens.input_ids[0, :start])
    assert span_text(tok, tokens, 0) == "a red cat"
    without = tokenize_prompts(tok, TemplateConfig(), ["a red cat"])
    assert system not in tok.decode(without.input_ids[0])  # (Qwen2.5's template writes its own default instead)


def test_template_without_system_role_folds_it_into_the_user_turn():
    """Gemma 2's template raises on a system turn; we fold it the way Gemma 3's template does natively."""
    gemma2, gemma3 = tokenizer("gemma2"), tokenizer("gemma3")  # same SentencePiece model, different templates
    template = TemplateConfig(system_prompt="You draw pictures.", instruction="Describe:\n")
    folded = tokenize_prompts(gemma2, template, ["a red cat"])
    native = tokenize_prompts(gemma3, template, ["a red cat"])
    assert torch.equal(folded.input_ids, native.input_ids)
    assert folded.infos == native.infos


def test_prompt_repeating_template_text_is_found_at_its_own_place():
    """A search for the prompt's text would hit the system turn first; the marker-based render does not."""
    tok = tokenizer("qwen2")
    tokens = tokenize_prompts(tok, TemplateConfig(system_prompt="user"), ["user"])
    start, end = tokens.infos[0].user_span
    assert tok.decode(tokens.input_ids[0, start:end]) == "user"
    assert tok.decode(tokens.input_ids[0, end:tokens.infos[0].num_tokens]) == "<|im_end|>\n"


def test_qwen3_thinking_switch_adds_nothing():
    tok = tokenizer("qwen3")
    tokens = tokenize_prompts(tok, TemplateConfig(), ["a red cat"])
    text = tok.decode(tokens.input_ids[0])
    assert "think" not in text and text == "<|im_start|>user\na red cat<|im_end|>\n"


@pytest.mark.parametrize("family", FAMILIES)
def test_long_prompt_is_truncated_with_a_warning(family):
    tok = tokenizer(family)
    prompt = "a red cat sitting on a blue chair in a green garden under a golden sunset"
    full = tokenize_prompts(tok, TemplateConfig(), [prompt]).infos[0]
    tokens = tokenize_prompts(tok, TemplateConfig(max_tokens=5), [prompt])
    info = tokens.infos[0]
    kept = span_text(tok, tokens, 0)
    assert info.user_span[1] - info.user_span[0] <= 5
    assert info.prompt_tokens == full.prompt_tokens > 5
    assert info.truncated_tokens == full.prompt_tokens - (info.user_span[1] - info.user_span[0])
    assert prompt.startswith(kept) and kept and info.truncated_text
    assert (kept + " " + info.truncated_text).split() == prompt.split()
    assert info.warnings == [
        f"prompt is {full.prompt_tokens} tokens; kept the first {info.user_span[1] - info.user_span[0]}, "
        f"dropped: '{info.truncated_text}'"
    ]
    # The template around the span is intact (nothing after the user turn was cut).
    assert info.num_tokens - info.user_span[1] == full.num_tokens - full.user_span[1]


def test_prompt_exactly_at_the_budget_is_kept_whole():
    tok = tokenizer("llama")
    n = tokenize_prompts(tok, TemplateConfig(), ["a red cat on a chair"]).infos[0].prompt_tokens
    info = tokenize_prompts(tok, TemplateConfig(max_tokens=n), ["a red cat on a chair"]).infos[0]
    assert info.truncated_tokens == 0 and info.warnings == []


@pytest.mark.parametrize("family", ["gemma2", "llama2", "qwen2"])
def test_truncation_never_splits_a_character(family):
    """Byte-fallback and byte-level BPE spread one CJK character or emoji over several tokens."""
    tok = tokenizer(family)
    prompt = "猫🐱猫🐱猫🐱猫🐱"
    for budget in range(1, 8):
        tokens = tokenize_prompts(tok, TemplateConfig(max_tokens=budget), [prompt])
        kept = span_text(tok, tokens, 0)
        assert "\ufffd" not in kept and prompt.startswith(kept)
        assert kept + tokens.infos[0].truncated_text == prompt


@pytest.mark.parametrize("family", ["qwen2", "gemma2"])
def test_batch_is_right_padded_and_each_row_matches_alone(family):
    tok = tokenizer(family)
    tokens = tokenize_prompts(tok, TemplateConfig(), PROMPTS)
    assert tokens.input_ids.dtype == torch.int64 and tokens.attention_mask.dtype == torch.int64
    for row, prompt in enumerate(PROMPTS):
        n = tokens.infos[row].num_tokens
        assert tokens.attention_mask[row].tolist() == [1] * n + [0] * (tokens.input_ids.shape[1] - n)
        alone = tokenize_prompts(tok, TemplateConfig(), [prompt])
        assert torch.equal(alone.input_ids[0], tokens.input_ids[row, :n])


def test_bad_inputs_are_refused():
    tok = tokenizer("gemma2")
    with pytest.raises(ConfigError, match="max_tokens"):
        tokenize_prompts(tok, TemplateConfig(max_tokens=0), ["cat"])
    with pytest.raises(TypeError, match="list of prompts"):
        tokenize_prompts(tok, TemplateConfig(), "cat")
    with pytest.raises(ValueError, match="at least one prompt"):
        tokenize_prompts(tok, TemplateConfig(), [])

    class SlowTokenizer:
        is_fast = False

    with pytest.raises(AdapterError, match="fast tokenizer"):
        tokenize_prompts(SlowTokenizer(), TemplateConfig(), ["cat"])


# ---- a recorded chat template governs whatever the tokenizer carries ------------------------------


@pytest.mark.parametrize("family", ["qwen3", "gemma2"])
def test_recorded_chat_template_renders_the_same_with_a_tokenizer_packaged_without_it(family):
    from devkit.tiny_models import other_tokenizer_packaging

    from adapter.template import record_chat_template
    tok = tokenizer(family)
    template = record_chat_template(TemplateConfig(system_prompt="Describe the image."), tok)
    assert template.chat_template == tok.chat_template and template.use_chat_template
    bare = other_tokenizer_packaging(make_folder(family), family)  # same vocabulary; qwen: ComfyUI's Qwen2.5 template
    assert bare.chat_template != tok.chat_template
    expected = tokenize_prompts(tok, template, PROMPTS)
    got = tokenize_prompts(bare, template, PROMPTS)
    assert torch.equal(got.input_ids, expected.input_ids)
    assert [i.user_span for i in got.infos] == [i.user_span for i in expected.infos]
    # Without the record, the other packaging renders other tokens (Qwen 2.5's template adds a default system
    # turn, Gemma's bare tokenizer has no template): this is what the record prevents.
    plain = TemplateConfig()
    assert not torch.equal(tokenize_prompts(bare, plain, PROMPTS).input_ids,
                           tokenize_prompts(tok, record_chat_template(plain, tok), PROMPTS).input_ids)


def test_recording_is_a_no_op_where_it_changes_nothing():
    from adapter.template import record_chat_template
    llama2 = tokenizer("llama2")  # no chat template: the plain path is what it renders, so that is recorded
    recorded = record_chat_template(TemplateConfig(), llama2)
    assert (recorded.use_chat_template, recorded.chat_template) == (False, "")
    assert torch.equal(tokenize_prompts(llama2, recorded, PROMPTS).input_ids,
                       tokenize_prompts(llama2, TemplateConfig(), PROMPTS).input_ids)
    off = TemplateConfig(use_chat_template=False)
    assert record_chat_template(off, tokenizer("qwen2")) is off
    custom = TemplateConfig(chat_template="{{ messages[0]['content'] }}")
    assert record_chat_template(custom, tokenizer("qwen2")) is custom


def make_folder(family):
    from devkit.tiny_models import make_tiny_llm
    return make_tiny_llm(family=family)
