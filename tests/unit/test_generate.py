"""adapter/generate.py: prompt enhancement from the loaded weights, on tiny random LLMs with real tokenizers."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from adapter import LLMLoadError, load_llm
from adapter.generate import (GenerationHead, GenerationSettings, _CachedDecoder, build_generation_prompt,
                              enhance_prompt, generate_tokens, generation_head, sample_next_token, stop_token_ids)
from adapter.llm import text_decoder
from devkit.tiny_models import make_tiny_llm

INSTRUCTION = "Describe the picture in detail."
RANDOM = dict(temperature=1.0, top_p=1.0)  # a random LLM's distribution is nearly flat: seeds must matter


@pytest.fixture(scope="module")
def qwen():
    return load_llm(make_tiny_llm(family="qwen2"))


def test_same_seed_same_text_other_seed_other_text(qwen):
    run = lambda seed: enhance_prompt(qwen, "a red cube", INSTRUCTION, GenerationSettings(12, seed, **RANDOM))  # noqa: E731
    first = run(1)
    torch.manual_seed(999)  # the global RNG is not what sampling uses
    assert run(1) == first and first
    assert len({first, run(2), run(3)}) == 3


def test_max_new_tokens_is_respected(qwen):
    head = generation_head(qwen)
    prompt = build_generation_prompt(qwen.tokenizer, INSTRUCTION, "a cat")
    for limit in (1, 5):
        tokens = generate_tokens(_CachedDecoder(qwen.model, qwen.device), head, prompt,
                                 GenerationSettings(limit, 0, **RANDOM), stop_ids=set())
        assert len(tokens) == limit
    text = enhance_prompt(qwen, "a cat", INSTRUCTION, GenerationSettings(3, 0, **RANDOM))
    assert len(qwen.tokenizer(text, add_special_tokens=False)["input_ids"]) <= 3 + 2  # decode/re-encode may merge or split a piece


def test_generation_stops_at_a_stop_token(qwen):
    head = generation_head(qwen)
    prompt = build_generation_prompt(qwen.tokenizer, INSTRUCTION, "a cat")
    sampled = GenerationSettings(6, 0, **RANDOM)
    first = generate_tokens(_CachedDecoder(qwen.model, qwen.device), head, prompt, sampled, stop_ids=set())
    assert first[2] not in first[:2]
    assert generate_tokens(_CachedDecoder(qwen.model, qwen.device), head, prompt, sampled, stop_ids={first[2]}) == first[:2]
    assert qwen.tokenizer.convert_tokens_to_ids("<|im_end|>") in stop_token_ids(qwen.tokenizer)


def test_instruction_and_text_go_into_one_user_turn(qwen):
    ids = build_generation_prompt(qwen.tokenizer, "Write a dense caption.", "a dog on a sofa")
    rendered = qwen.tokenizer.decode(ids)
    assert "<|im_start|>user\nWrite a dense caption.\n\na dog on a sofa<|im_end|>" in rendered
    assert rendered.endswith("<|im_start|>assistant\n")  # the model answers next


def test_instruction_changes_what_the_llm_reads(qwen):
    seen = []
    head = generation_head(qwen)
    decoder = _CachedDecoder(qwen.model, qwen.device)
    spy = lambda ids: seen.append(list(ids)) or decoder(ids)  # noqa: E731
    prompt = build_generation_prompt(qwen.tokenizer, "Mention the colour purple.", "a cube")
    generate_tokens(spy, head, prompt, GenerationSettings(2, 0, temperature=0.0), stop_ids=set())
    assert "Mention the colour purple." in qwen.tokenizer.decode(seen[0])


def test_plain_text_prompt_without_a_chat_template():
    llama2 = load_llm(make_tiny_llm(family="llama2"))
    assert not llama2.tokenizer.chat_template
    ids = build_generation_prompt(llama2.tokenizer, "Expand:", "a boat")
    assert ids[0] == llama2.tokenizer.bos_token_id
    assert llama2.tokenizer.decode(ids, skip_special_tokens=True).replace(" ", "") == "Expand:\n\naboat\n\nCaption:".replace(" ", "")
    steps = []
    text = enhance_prompt(llama2, "a boat", "Expand:", GenerationSettings(4, 0, **RANDOM), on_token=steps.append)
    assert isinstance(text, str) and 1 <= len(steps) <= 4  # it generated, within max_new_tokens


@pytest.mark.parametrize("family", ["qwen2", "llama", "gemma2"])
def test_kv_cache_decoding_equals_recomputing_the_whole_sequence(family):
    """The cached path (transformers) and the recomputing path (ComfyUI's decoder has no KV cache) agree."""
    llm = load_llm(make_tiny_llm(family=family))
    head = generation_head(llm)
    prompt = build_generation_prompt(llm.tokenizer, INSTRUCTION, "a small red house near the river at night")
    model = text_decoder(llm.model)
    ids = []

    def recompute(new_ids):
        ids.extend(new_ids)
        return model(input_ids=torch.tensor([ids]), use_cache=False).last_hidden_state[0, -1]

    greedy = GenerationSettings(12, 0, temperature=0.0)  # past the 8-token sliding window of the tiny Gemma
    with torch.no_grad():
        cached = generate_tokens(_CachedDecoder(llm.model, llm.device), head, prompt, greedy, stop_ids=set())
        recomputed = generate_tokens(recompute, head, prompt, greedy, stop_ids=set())
    assert cached == recomputed


def test_gemma2_logits_are_soft_capped():
    gemma = load_llm(make_tiny_llm(family="gemma2"))
    head = generation_head(gemma)
    assert head.tied and head.softcap == gemma.model.config.final_logit_softcapping
    assert head.logits(torch.full((64,), 1e3)).abs().max() <= head.softcap


def test_top_p_keeps_only_the_nucleus():
    logits = torch.tensor([2.0, 1.0, 0.0, -5.0])  # probabilities 0.665, 0.245, 0.090, 0.0006
    draws = {sample_next_token(logits, torch.Generator().manual_seed(s), 1.0, top_p=0.5) for s in range(50)}
    assert draws == {0}  # token 0 alone holds > 50%
    draws = {sample_next_token(logits, torch.Generator().manual_seed(s), 1.0, top_p=0.95) for s in range(200)}
    assert draws == {0, 1, 2}  # the first three reach 95%; token 3 is outside the nucleus
    assert sample_next_token(logits, torch.Generator().manual_seed(0), 0.0, 0.9) == 0  # greedy


def _untied_copy(tmp_path, with_head: bool):
    """The tiny Qwen2 folder with tie_word_embeddings off, optionally with an lm_head in a second shard."""
    folder = tmp_path / ("untied-with-head" if with_head else "untied")
    shutil.copytree(make_tiny_llm(family="qwen2"), folder)
    config = json.loads((folder / "config.json").read_text())
    config["tie_word_embeddings"] = False
    (folder / "config.json").write_text(json.dumps(config))
    head = None
    if with_head:
        head = torch.randn(config["vocab_size"], config["hidden_size"], generator=torch.Generator().manual_seed(7))
        save_file({"lm_head.weight": head}, str(folder / "head.safetensors"))
    return folder, head


def test_an_llm_without_a_generation_head_fails_clearly(tmp_path):
    folder, _ = _untied_copy(tmp_path, with_head=False)
    llm = load_llm(folder)
    with pytest.raises(LLMLoadError, match="cannot generate text: its output layer is not tied.*no lm_head.weight"):
        generation_head(llm)
    with pytest.raises(LLMLoadError, match="cannot generate text"):
        enhance_prompt(llm, "a cube", INSTRUCTION)


def test_an_untied_head_is_read_from_the_checkpoint(tmp_path):
    folder, written = _untied_copy(tmp_path, with_head=True)
    llm = load_llm(folder)
    assert not hasattr(llm.model, "lm_head")  # the encode path still loads no head
    head = generation_head(llm)
    assert not head.tied and head.source.endswith("head.safetensors:lm_head.weight")
    torch.testing.assert_close(head.weight, written)
    assert enhance_prompt(llm, "a cube", INSTRUCTION, GenerationSettings(3, 0, **RANDOM), head=head)


def test_empty_text_and_bad_settings_are_refused(qwen):
    with pytest.raises(ValueError, match="empty"):
        enhance_prompt(qwen, "  ", INSTRUCTION)
    with pytest.raises(ValueError, match="max_new_tokens"):
        GenerationSettings(0)
    with pytest.raises(ValueError, match="top_p"):
        GenerationSettings(8, top_p=0.0)


def test_a_backend_without_final_hidden_states_cannot_generate(qwen):
    class Opaque:  # e.g. an LLM handle from an implementation that exposes only the states of every block
        model, tokenizer, info, device, dtype = qwen.model, qwen.tokenizer, qwen.info, qwen.device, qwen.dtype

    with pytest.raises(LLMLoadError, match="cannot generate text: it exposes no way"):
        enhance_prompt(Opaque(), "a cube", INSTRUCTION, head=GenerationHead(torch.zeros(4, 64)))


def test_a_backend_with_final_hidden_states_generates_like_transformers(qwen):
    """The duck-typed route ComfyUI-implemented LLMs take (nodes/comfy_llm.py): no KV cache, same tokens."""
    base = text_decoder(qwen.model)

    class ComfyLike:
        model, tokenizer, info, device, dtype = qwen.model, qwen.tokenizer, qwen.info, qwen.device, qwen.dtype
        tie_word_embeddings, final_logit_softcapping = True, None

        def final_hidden_states(self, input_ids):
            return base(input_ids=input_ids, use_cache=False).last_hidden_state

    greedy = GenerationSettings(8, 0, temperature=0.0)
    assert enhance_prompt(ComfyLike(), "a cube", INSTRUCTION, greedy) == enhance_prompt(qwen, "a cube", INSTRUCTION, greedy)
