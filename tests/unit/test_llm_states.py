"""load_llm / run_llm / encode_prompts: the pre-final-norm states of every block, for every family."""
from __future__ import annotations

import functools
import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from adapter.config import TemplateConfig
from adapter.errors import LLMLoadError
from adapter.fingerprint import tokenizer_fingerprint
from adapter.llm import encode_prompts, find_decoder_parts, load_llm, run_llm
from devkit.tiny_models import FAMILIES, make_tiny_llm, make_tiny_multimodal_gemma3

ARCHITECTURES = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "llama": "LlamaForCausalLM",
                 "llama2": "LlamaForCausalLM", "gemma2": "Gemma2ForCausalLM", "gemma3": "Gemma3ForCausalLM"}
PROMPTS = ["a red cat", "", "a photo of a small dog on a beach at sunset, 猫 🐱"]


@functools.lru_cache(maxsize=None)
def tiny(family: str):
    return load_llm(make_tiny_llm(family=family))


@pytest.mark.parametrize("family", FAMILIES)
def test_load_and_encode(family):
    llm = tiny(family)
    info = llm.info
    assert (info.architecture, info.hidden_size, info.num_layers) == (ARCHITECTURES[family], 64, 2)
    assert info.model_type == json.loads((make_tiny_llm(family=family) / "config.json").read_text())["model_type"]
    assert info.tokenizer_fingerprint == tokenizer_fingerprint(llm.tokenizer)
    assert not hasattr(llm.model, "lm_head") and not any(p.requires_grad for p in llm.model.parameters())
    encoded = encode_prompts(llm, TemplateConfig(), PROMPTS)
    lengths = [i.num_tokens for i in encoded.infos]
    assert encoded.hidden_states.shape == (3, 3, max(lengths), 64) and encoded.hidden_states.dtype == torch.float32
    assert encoded.attention_mask.sum(dim=1).tolist() == lengths
    assert torch.isfinite(encoded.hidden_states).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_states_are_block_outputs_before_the_final_norm(family):
    """Entry 0 is the first block's input, entry i the output of block i; the final norm is NOT applied."""
    llm = tiny(family)
    parts = find_decoder_parts(llm.model)
    tokens = encode_prompts(llm, TemplateConfig(), ["a red cat"])
    ids, mask = tokens_ids(llm, "a red cat")
    seen: list[torch.Tensor] = []
    hooks = [parts.layers[0].register_forward_pre_hook(lambda m, args, kwargs: seen.append(args[0] if args else kwargs["hidden_states"]), with_kwargs=True)]
    hooks += [layer.register_forward_hook(lambda m, args, out: seen.append(out[0] if isinstance(out, tuple) else out)) for layer in parts.layers]
    with torch.no_grad():
        reference = llm.model(input_ids=ids, attention_mask=mask)
    for hook in hooks:
        hook.remove()
    states = tokens.hidden_states
    for i, expected in enumerate(seen):
        torch.testing.assert_close(states[:, i], expected, rtol=0, atol=0)
    # The norm applied to our last entry is transformers' last_hidden_state, and differs from it.
    torch.testing.assert_close(parts.norm(states[:, -1]), reference.last_hidden_state, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(states[:, -1], reference.last_hidden_state, atol=1e-3)


def tokens_ids(llm, prompt: str):
    from adapter.template import tokenize_prompts

    tokens = tokenize_prompts(llm.tokenizer, TemplateConfig(), [prompt])
    return tokens.input_ids, tokens.attention_mask


def _rms_norm(x, weight, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def _rotate(x, cos, sin):
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def manual_llama_forward(weights: dict, config: dict, ids: torch.Tensor) -> list[torch.Tensor]:
    """A from-scratch Llama / Qwen2 forward over the saved weights: the states before the final norm."""
    heads, kv_heads, eps = config["num_attention_heads"], config["num_key_value_heads"], config["rms_norm_eps"]
    head_dim = config["hidden_size"] // heads
    theta = (config.get("rope_parameters") or {}).get("rope_theta") or config.get("rope_theta", 10000.0)
    positions = torch.arange(ids.shape[1], dtype=torch.float32)
    freqs = torch.outer(positions, 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    cos, sin = torch.cat((freqs, freqs), -1).cos(), torch.cat((freqs, freqs), -1).sin()
    h = weights["model.embed_tokens.weight"][ids]
    states = [h]
    for i in range(config["num_hidden_layers"]):
        w = {k[len(f"model.layers.{i}."):]: v for k, v in weights.items() if k.startswith(f"model.layers.{i}.")}
        x = _rms_norm(h, w["input_layernorm.weight"], eps)

        def project(name, n):
            out = F.linear(x, w[f"self_attn.{name}.weight"], w.get(f"self_attn.{name}.bias"))
            return out.view(1, -1, n, head_dim).transpose(1, 2)

        q, k, v = project("q_proj", heads), project("k_proj", kv_heads), project("v_proj", kv_heads)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        k, v = k.repeat_interleave(heads // kv_heads, 1), v.repeat_interleave(heads // kv_heads, 1)
        scores = q @ k.transpose(-1, -2) / head_dim**0.5
        scores = scores.masked_fill(torch.ones_like(scores, dtype=torch.bool).triu(1), float("-inf"))
        attn = (scores.softmax(-1) @ v).transpose(1, 2).reshape(1, -1, heads * head_dim)
        h = h + F.linear(attn, w["self_attn.o_proj.weight"])
        x = _rms_norm(h, w["post_attention_layernorm.weight"], eps)
        h = h + F.linear(F.silu(F.linear(x, w["mlp.gate_proj.weight"])) * F.linear(x, w["mlp.up_proj.weight"]), w["mlp.down_proj.weight"])
        states.append(h)
    return states


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_states_match_a_manual_forward(family):
    folder = make_tiny_llm(family=family)
    weights = load_file(folder / "model.safetensors")
    config = json.loads((folder / "config.json").read_text())
    llm = tiny(family)
    ids, mask = tokens_ids(llm, "a photo of a red cat on a chair")
    with torch.no_grad():
        states = run_llm(llm.model, ids, mask)
    manual = manual_llama_forward(weights, config, ids)
    assert states.shape[1] == len(manual) == 3
    for i, expected in enumerate(manual):
        torch.testing.assert_close(states[:, i], expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_prompt_alone_equals_prompt_in_a_padded_batch(family):
    llm = tiny(family)
    with torch.no_grad():
        batch = encode_prompts(llm, TemplateConfig(), PROMPTS)
        for row, prompt in enumerate(PROMPTS):
            alone = encode_prompts(llm, TemplateConfig(), [prompt])
            n = batch.infos[row].num_tokens
            assert alone.hidden_states.shape[2] == n
            torch.testing.assert_close(batch.hidden_states[row, :, :n], alone.hidden_states[0], rtol=1e-5, atol=1e-5)


def test_run_llm_accepts_a_causal_lm_without_computing_logits():
    from transformers import AutoModelForCausalLM

    folder = make_tiny_llm(family="gemma2")
    causal = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()
    called = []
    causal.lm_head.register_forward_hook(lambda *args: called.append(True))
    llm = tiny("gemma2")
    ids, mask = tokens_ids(llm, "a red cat")
    with torch.no_grad():
        torch.testing.assert_close(run_llm(causal, ids, mask), run_llm(llm.model, ids, mask))
    assert called == []


def test_multimodal_checkpoint_keeps_the_text_decoder(tmp_path):
    folder = make_tiny_multimodal_gemma3(tmp_path / "gemma3-mm")
    llm = load_llm(folder)
    assert (llm.info.architecture, llm.info.model_type, llm.info.hidden_size, llm.info.num_layers) == (
        "Gemma3ForConditionalGeneration", "gemma3", 64, 2)
    assert not any("vision" in name for name, _ in llm.model.named_modules())
    ids, mask = tokens_ids(llm, "a red cat")
    from transformers import Gemma3ForConditionalGeneration

    full = Gemma3ForConditionalGeneration.from_pretrained(folder, local_files_only=True).eval()
    with torch.no_grad():  # run_llm finds the same decoder inside the full model
        torch.testing.assert_close(run_llm(full, ids, mask), encode_prompts(llm, TemplateConfig(), ["a red cat"]).hidden_states)


# ---- load errors ---------------------------------------------------------------------------------


@pytest.fixture
def folder_copy(tmp_path):
    """A private copy of a small (SentencePiece-vocabulary) model folder to break."""
    dest = tmp_path / "gemma2"
    shutil.copytree(make_tiny_llm(family="gemma2"), dest)
    return dest


def test_missing_folder(tmp_path):
    with pytest.raises(LLMLoadError, match="does not exist"):
        load_llm(tmp_path / "nowhere")


def test_missing_config(folder_copy):
    (folder_copy / "config.json").unlink()
    with pytest.raises(LLMLoadError, match="has no config.json"):
        load_llm(folder_copy)


def test_unknown_model_type(folder_copy):
    config = json.loads((folder_copy / "config.json").read_text())
    config["model_type"] = "not_a_real_llm"
    (folder_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(LLMLoadError, match="unknown model_type needs a newer transformers"):
        load_llm(folder_copy)


def test_missing_weights(folder_copy):
    (folder_copy / "model.safetensors").unlink()
    with pytest.raises(LLMLoadError, match=r"has no weights \(\*\.safetensors\)"):
        load_llm(folder_copy)


def test_missing_shard(folder_copy):
    """A half-copied sharded model: the index names a shard that is not there."""
    keys = load_file(folder_copy / "model.safetensors").keys()
    (folder_copy / "model.safetensors").rename(folder_copy / "model-00001-of-00002.safetensors")
    weight_map = {key: "model-00001-of-00002.safetensors" for key in keys}
    weight_map["model.norm.weight"] = "model-00002-of-00002.safetensors"
    (folder_copy / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    with pytest.raises(LLMLoadError, match="model-00002-of-00002.safetensors is missing"):
        load_llm(folder_copy)


def test_truncated_weights(folder_copy):
    weights = folder_copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(LLMLoadError, match="cannot load the LLM weights in .*gemma2"):
        load_llm(folder_copy)


def test_pickle_weights_are_refused_unopened(folder_copy):
    (folder_copy / "model.safetensors").unlink()
    (folder_copy / "pytorch_model.bin").write_bytes(b"not even a pickle: it must not be opened")
    with pytest.raises(LLMLoadError, match="only pickle weights.*safetensors"):
        load_llm(folder_copy)


def test_missing_tokenizer(folder_copy):
    for name in ("tokenizer.json", "tokenizer.model"):
        (folder_copy / name).unlink()
    with pytest.raises(LLMLoadError, match="has no tokenizer"):
        load_llm(folder_copy)


def test_fp16_on_cpu_is_refused(folder_copy):
    with pytest.raises(LLMLoadError, match="float16 does not run on a CPU.*float32"):
        load_llm(folder_copy, dtype=torch.float16, device="cpu")


def test_bfloat16_on_cpu_loads(folder_copy):
    llm = load_llm(folder_copy, dtype=torch.bfloat16)
    assert llm.dtype == torch.bfloat16 and next(llm.model.parameters()).dtype == torch.bfloat16
    assert encode_prompts(llm, TemplateConfig(), ["a red cat"]).hidden_states.dtype == torch.bfloat16


def test_encoder_only_model_is_refused(tmp_path, folder_copy):
    """A BERT folder loads in transformers but has no decoder stack with a final norm."""
    from transformers import BertConfig, BertModel

    bert = tmp_path / "bert"
    BertModel(BertConfig(vocab_size=1000, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(bert)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(folder_copy / name, bert / name)
    with pytest.raises(LLMLoadError, match="not a supported decoder-only LLM"):
        load_llm(bert)


def test_encoder_decoder_model_is_refused(tmp_path, folder_copy):
    """An encoder-decoder family with no encoder path here (BART) is refused; T5 / T5Gemma load as encoders
    (tests/unit/test_foreign_text.py)."""
    from transformers import BartConfig, BartModel

    bart = tmp_path / "bart"
    BartModel(BartConfig(vocab_size=1000, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                         decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64)).save_pretrained(bart)
    shutil.copy(folder_copy / "tokenizer.json", bart / "tokenizer.json")
    with pytest.raises(LLMLoadError, match="encoder-decoder"):
        load_llm(bart)
