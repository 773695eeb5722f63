"""Text sides of the public adapters on tiny random models with real tokenizers (tests/support)."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from adapter import load_llm
from adapter.errors import AdapterMismatchError
from adapter.foreign.text import (ELLA_TEXT, ROUWEI_GEMMA_TEXT, ROUWEI_T5GEMMA_TEXT, LoadedEncoder, check_text_side,
                                  encode_text)
from devkit.tiny_encoders import make_tiny_t5, make_tiny_t5gemma
from devkit.tiny_models import make_tiny_llm

PROMPT = "a red cat sitting on a blue chair, oil painting"


@pytest.fixture(scope="module")
def t5():
    return load_llm(make_tiny_t5())


@pytest.fixture(scope="module")
def t5gemma():
    return load_llm(make_tiny_t5gemma())


@pytest.fixture(scope="module")
def gemma():
    return load_llm(make_tiny_llm(family="gemma3"))


def test_t5_folder_loads_as_an_encoder(t5):
    assert isinstance(t5, LoadedEncoder) and t5.info.model_type == "t5" and t5.info.architecture == "T5EncoderModel"
    with pytest.raises(AdapterMismatchError, match="text encoder"):
        t5.hidden_states(torch.ones(1, 3, dtype=torch.long), torch.ones(1, 3, dtype=torch.long))


def test_ella_text_side_padded_and_flexible(t5):
    from transformers import T5EncoderModel

    padded = encode_text(t5, ELLA_TEXT, [PROMPT])
    ids = t5.tokenizer(PROMPT, return_tensors="pt", padding="max_length", max_length=128, truncation=True)
    reference = T5EncoderModel.from_pretrained(make_tiny_t5()).eval()(**ids).last_hidden_state
    assert padded.states.shape == (1, 128, t5.info.hidden_size)
    assert padded.tokens[0] == int(ids["attention_mask"].sum()) < 128
    assert bool(padded.mask.all())  # ELLA's reference reads every position, T5's padding included
    assert torch.allclose(padded.states, reference, atol=1e-6)

    flexible = encode_text(t5, replace(ELLA_TEXT, pad=False), [PROMPT])
    n = flexible.tokens[0]
    assert flexible.states.shape[1] == n and bool(flexible.mask.all())
    assert torch.allclose(flexible.states, padded.states[:, :n], atol=1e-5)  # T5 masks its padding


def test_t5gemma_text_side_appends_eos_and_pads_to_512(t5gemma):
    out = encode_text(t5gemma, ROUWEI_T5GEMMA_TEXT, [PROMPT])
    ids = t5gemma.tokenizer(PROMPT + "<eos>")["input_ids"]
    assert ids[-1] == t5gemma.tokenizer.eos_token_id
    assert out.states.shape == (1, 512, t5gemma.info.hidden_size) and out.tokens == [len(ids)]
    assert int(out.mask.sum()) == len(ids)


def test_gemma_chat_side_is_the_final_norm_state_after_skip_first(gemma):
    from transformers import AutoModelForCausalLM

    skip = 5
    side = replace(ROUWEI_GEMMA_TEXT, skip_first=skip)
    out = encode_text(gemma, side, [PROMPT])
    # Independently: the reference's recipe on the full CausalLM (hidden_states[-1] is after the final norm).
    messages = [{"role": "system", "content": side.system_prompt}, {"role": "user", "content": PROMPT}]
    inputs = gemma.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                                 return_tensors="pt")
    full = AutoModelForCausalLM.from_pretrained(make_tiny_llm(family="gemma3")).eval()
    with torch.no_grad():
        reference = full(**inputs, output_hidden_states=True).hidden_states[-1][:, skip:].float()
    assert out.states.shape == reference.shape
    assert torch.allclose(out.states, reference, atol=1e-5)
    # and it is not the pre-norm state our own adapters read
    pre_norm = gemma.hidden_states(inputs["input_ids"], inputs["attention_mask"])[:, -1, skip:]
    assert not torch.allclose(out.states, pre_norm.float(), atol=1e-2)
    # The template prefix (bos, turn marker, role, system text) is measured with the tokenizer at hand.
    prefix = gemma.tokenizer.apply_chat_template([{"role": "system", "content": side.system_prompt},
                                                  {"role": "user", "content": ""}], add_generation_prompt=False, tokenize=False)
    assert out.prefix_tokens > 4 and prefix.startswith("<bos><start_of_turn>user\n" + side.system_prompt)


def test_gemma_chat_side_truncates_to_max_length(gemma):
    out = encode_text(gemma, replace(ROUWEI_GEMMA_TEXT, max_length=40), [" ".join([PROMPT] * 6), "cat"])
    assert out.states.shape[1] == 40 and out.dropped[0] > 0 and out.tokens[0] == 40
    assert out.dropped[1] == 0 and out.mask[1].sum() == out.tokens[1] < 40


def test_pairings_name_both_sides(t5, t5gemma, gemma):
    with pytest.raises(AdapterMismatchError, match=r"needs a decoder LLM \(Gemma-3-1B-it\).*T5 encoder 't5-w64-seed0'"):
        check_text_side(ROUWEI_GEMMA_TEXT, t5, "rouwei_gemma.safetensors")
    with pytest.raises(AdapterMismatchError, match=r"needs a T5 encoder folder.*decoder LLM 'gemma3-seed0'"):
        check_text_side(ELLA_TEXT, gemma, "ella-sd1.5-tsc-t5xl.safetensors")
    with pytest.raises(AdapterMismatchError, match=r"needs a T5Gemma encoder folder.*T5 encoder"):
        check_text_side(ROUWEI_T5GEMMA_TEXT, t5, "rouwei_t5gemma.safetensors")
    check_text_side(ELLA_TEXT, t5, "ella")  # the right pairs pass
    check_text_side(ROUWEI_T5GEMMA_TEXT, t5gemma, "rouwei_t5gemma")
    check_text_side(ROUWEI_GEMMA_TEXT, gemma, "rouwei_gemma")


def test_a_text_model_of_another_width_is_refused(t5):
    from adapter.foreign import EllaConfig
    from adapter.foreign.layouts import ForeignConfig
    from adapter.foreign.text import check_pairing
    from adapter.config import TARGETS

    config = ForeignConfig("ella", "ELLA-SD1.5-TSC-T5XL", "ella-tsc", TARGETS["sd15"], ELLA_TEXT, EllaConfig(), True)
    with pytest.raises(AdapterMismatchError, match=r"reads 2048-wide text states, but 't5-w64-seed0' \(t5\) gives 64"):
        check_pairing(config, t5, "ella-sd1.5-tsc-t5xl.safetensors")
