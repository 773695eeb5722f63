"""Parity: the states from ComfyUI's own LLM implementation equal the transformers path's, for the same weights.

For each family ComfyUI 0.3.75 implements that the pack supports (Qwen 2.5, Qwen 3, Llama 3, Gemma 2,
Gemma 3), one tiny random Hugging Face folder (support.comfy_tiny_llm.parity_model: tiny_models'
tokenizer, more blocks, see PARITY_CHANGES) is loaded twice:
- transformers: adapter.load_llm(folder)                          -> adapter.LoadedLLM
- ComfyUI:      its state dict through comfy.sd's single-file loader, built with ComfyUI's own classes
                at the tiny shapes (TEST-ONLY construction, support/comfy_tiny_llm.py), then the pack's
                backend nodes.comfy_llm.handle_from_clip(clip)   -> ComfyLLM
and the same prompts go through adapter.encode_prompts on both, with an adapter template recorded from
the folder's tokenizer (as `python -m adapter init` does).

Tolerance, fixed before the first run: fp32 on both sides; over real (unpadded) tokens,
max |comfy - transformers| / max |transformers| < 1e-4 for the whole [B, L+1, T, H] tensor. (Measured
when written: Qwen 2.5 1.7e-7, Qwen 3 2.4e-7, Llama 3 1.2e-7, Gemma 2 0, Gemma 3 6.9e-7; Gemma 2 with the
real model's soft-capping on the transformers side and attention logits of std ~10: 0.27.) The token ids,
the mask, the user spans and the tokenizer fingerprint must be identical.
"""
from __future__ import annotations

import pytest
import torch

from devkit.comfy_pack import load_pack, pack_module

RELATIVE_TOLERANCE = 1e-4
FAMILIES = ["qwen2", "qwen3", "llama", "gemma2", "gemma3"]
PROMPTS = ["a red cat sitting on a chair", "", "東京の夜景、ネオン、雨 — a long prompt with enough words to pad the others"]


@pytest.fixture(scope="module")
def lib():
    load_pack()
    return pack_module("adapter")


@pytest.fixture(scope="module", params=FAMILIES)
def pair(request, lib):
    """(family, transformers LoadedLLM, ComfyUI handle) for one parity model."""
    from support.comfy_tiny_llm import parity_model, tiny_comfy_clip

    family = request.param
    folder = parity_model(family)
    clip = tiny_comfy_clip(folder, family)
    handle = pack_module("nodes.comfy_llm").handle_from_clip(clip, None, identity="parity-test")
    return family, lib.load_llm(folder), handle


def relative_difference(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    """max |a - b| / max |b| over the real tokens of [B, L+1, T, H] states."""
    real = mask.bool()
    a, b = a.transpose(1, 2)[real], b.transpose(1, 2)[real]  # [real tokens, L+1, H]
    return float((a - b).abs().max() / b.abs().max())


def test_same_states_tokens_and_fingerprint(pair, lib):
    family, hf, handle = pair
    comfy = handle.loaded
    assert (handle.backend, handle.partial_load) == ("comfyui", True)
    assert comfy.info.tokenizer_fingerprint == hf.info.tokenizer_fingerprint  # one adapter serves both
    assert (comfy.info.hidden_size, comfy.info.num_layers) == (hf.info.hidden_size, hf.info.num_layers)
    template = lib.record_chat_template(lib.TemplateConfig(system_prompt="Describe the image."), hf.tokenizer)
    with torch.no_grad():
        ours, theirs = lib.encode_prompts(comfy, template, PROMPTS), lib.encode_prompts(hf, template, PROMPTS)
    expected_ids = lib.tokenize_prompts(hf.tokenizer, template, PROMPTS).input_ids
    assert torch.equal(lib.tokenize_prompts(comfy.tokenizer, template, PROMPTS).input_ids, expected_ids)
    assert torch.equal(ours.attention_mask, theirs.attention_mask)
    assert [i.user_span for i in ours.infos] == [i.user_span for i in theirs.infos]
    assert ours.hidden_states.shape == theirs.hidden_states.shape == (len(PROMPTS), hf.info.num_layers + 1,
                                                                      ours.attention_mask.shape[1], hf.info.hidden_size)
    assert ours.hidden_states.dtype == torch.float32
    assert relative_difference(ours.hidden_states, theirs.hidden_states, theirs.attention_mask) < RELATIVE_TOLERANCE


def test_last_entry_is_the_final_norms_input_not_its_output(pair, lib):
    """ComfyUI's `intermediate_output="all"` ends with the final norm's output; the contract wants its input."""
    family, hf, handle = pair
    model = handle.loaded.model
    ids = lib.tokenize_prompts(hf.tokenizer, lib.TemplateConfig(), ["a red cat"])
    with torch.no_grad():
        states = handle.loaded.hidden_states(ids.input_ids, ids.attention_mask)
        normed, _ = model(ids.input_ids, ids.attention_mask, dtype=torch.float32)
        final = handle.loaded.final_hidden_states(ids.input_ids)
    torch.testing.assert_close(model.model.norm(states[:, -1]), normed)
    torch.testing.assert_close(final, normed)
    assert not torch.allclose(states[:, -1], normed)


def test_gemma2_without_soft_capping_is_the_known_difference(lib, tmp_path):
    """ComfyUI's Gemma 2 leaves out attention-logit soft-capping (50): with attention logits of a real
    model's size (q/k scaled up here) the states differ beyond the tolerance, and only because of it."""
    import json

    from safetensors.torch import load_file, save_file

    from support.comfy_tiny_llm import parity_model, tiny_comfy_clip

    source = parity_model("gemma2")
    folder = tmp_path / "gemma2-large-logits"
    folder.mkdir()
    for item in source.iterdir():
        if item.name != "model.safetensors":
            (folder / item.name).write_bytes(item.read_bytes())
    weights = load_file(source / "model.safetensors")
    for name in weights:
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            weights[name] = weights[name] * 20  # logits of std ~10, as in trained models
    save_file(weights, folder / "model.safetensors")
    handle = pack_module("nodes.comfy_llm").handle_from_clip(tiny_comfy_clip(folder, "gemma2"), None, identity="x")
    template = lib.record_chat_template(lib.TemplateConfig(), handle.loaded.tokenizer)

    def difference():
        hf = lib.load_llm(folder)
        with torch.no_grad():
            ours, theirs = lib.encode_prompts(handle.loaded, template, PROMPTS), lib.encode_prompts(hf, template, PROMPTS)
        return relative_difference(ours.hidden_states, theirs.hidden_states, theirs.attention_mask)

    assert difference() < RELATIVE_TOLERANCE  # parity model: soft-capping off on the transformers side
    config = json.loads((folder / "config.json").read_text())
    config["attn_logit_softcapping"] = 50.0  # the real Gemma 2's value
    (folder / "config.json").write_text(json.dumps(config))
    assert difference() > 10 * RELATIVE_TOLERANCE


def test_unrecorded_template_falls_back_to_comfys_tokenizer(pair, lib):
    """Adapters made before templates were recorded use the tokenizer's own chat template: ComfyUI's Gemma
    files carry none, so only a recorded template renders the folder's tokens there."""
    family, hf, handle = pair
    plain = lib.TemplateConfig()
    same = torch.equal(lib.tokenize_prompts(handle.loaded.tokenizer, plain, PROMPTS).input_ids,
                       lib.tokenize_prompts(hf.tokenizer, plain, PROMPTS).input_ids)
    # qwen2's folder uses ComfyUI's own Qwen2.5 tokenizer files (with their template); the others set another one.
    assert same == (family == "qwen2")
