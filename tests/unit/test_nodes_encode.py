"""The three nodes' `execute`, in-process on a tiny random Qwen2 (real tokenizer) and small random adapters.

Real ComfyUI modules (folder_paths, ModelPatcher, model management in CPU mode) and the real
adapter library; only CLIP is a stand-in here (a real CLIP runs in the e2e tests), so that the
checks of concat, strengths, pooled blending and width validation see exact known tensors.
"""
from __future__ import annotations

import pytest
import torch

from devkit.comfy_pack import pack_module
from support.node_models import FakeClip, node_models, qwen  # noqa: F401  (fixtures; env = node_models)


@pytest.fixture(scope="module")
def sd15(env):
    return env[1]["LLMDiffLoadAdapter"].execute("qwen-sd15.safetensors").args[0]


@pytest.fixture(scope="module")
def sdxl(env):
    return env[1]["LLMDiffLoadAdapter"].execute("qwen-sdxl.safetensors").args[0]


@pytest.fixture
def encode(env):
    """LLMDiffTextEncode.execute with a fresh encode cache -> (conditioning, info)."""
    pack, nodes = env
    pack_module("nodes.encode").ENCODE_CACHE.clear()
    return lambda *args, **kwargs: nodes["LLMDiffTextEncode"].execute(*args, **kwargs).args


def adapter_output(pack, llm, adapter, text):
    """The library's own answer for one prompt, to compare the node against."""
    with torch.no_grad():
        enc = pack_module("adapter").encode_prompts(llm.loaded, adapter.config.template, [text])
        return adapter.module(enc.hidden_states.float(), enc.attention_mask)


def test_sd15_conditioning_is_plain_fp32_cpu_and_equals_the_library(env, qwen, sd15, encode):
    cond, info = encode(qwen, sd15, "a red cube on a table")
    [[context, extras]] = cond
    assert context.shape == (1, 77, 768) and context.dtype == torch.float32 and context.device.type == "cpu"
    assert extras == {}  # SD1.5 without CLIP: no pooled vector, no SDXL size fields
    expected = adapter_output(env[0], qwen, sd15, "a red cube on a table").context
    torch.testing.assert_close(context, expected)
    assert "tiny-qwen2" in info and "sd15" in info and "of 256 tokens used" in info


def test_empty_prompt_is_the_adapters_empty_conditioning(env, qwen, sd15, encode):
    [[empty, _]], info = encode(qwen, sd15, "")
    torch.testing.assert_close(empty, adapter_output(env[0], qwen, sd15, "").context)
    [[other, _]], _ = encode(qwen, sd15, "a dog")
    assert not torch.allclose(empty, other)
    assert "0 of 256 tokens used" in info


def test_non_latin_and_emoji(env, qwen, sd15, encode):
    [[context, _]], info = encode(qwen, sd15, "一只红色的猫 🐱 на крыше")
    assert torch.isfinite(context).all()
    torch.testing.assert_close(context, adapter_output(env[0], qwen, sd15, "一只红色的猫 🐱 на крыше").context)
    assert "truncated" not in info


def test_prompt_over_budget_is_truncated_and_reported(qwen, sd15, encode):
    [[context, _]], info = encode(qwen, sd15, "a very long prompt about cubes " * 200)
    assert context.shape == (1, 77, 768)
    assert "truncated:" in info and "tokens over the budget were dropped" in info


def test_a1111_weights_are_stripped_for_the_llm_only(qwen, sd15, encode):
    clip = FakeClip(768, 768)
    [[weighted, _]], info = encode(qwen, sd15, "a (red:1.3) cube", clip=clip)
    [[plain, _]], plain_info = encode(qwen, sd15, "a red cube")
    torch.testing.assert_close(weighted, plain)
    assert "weights" in info and "weights" not in plain_info
    assert clip.texts == ["a (red:1.3) cube"]  # CLIP gets the original text, weights and all


def test_cache_skips_the_llm_for_a_repeated_prompt(env, qwen, sd15, encode, monkeypatch):
    calls = []
    real = pack_module("adapter").encode_prompts
    monkeypatch.setattr(pack_module("adapter"), "encode_prompts", lambda *a: calls.append(a) or real(*a))
    [[first, _]], _ = encode(qwen, sd15, "a green sphere")
    [[again, _]], info = encode(qwen, sd15, "a green sphere", llm_strength=0.5)
    assert len(calls) == 1 and "cached" in info
    torch.testing.assert_close(again, first * 0.5)


def test_cache_is_bounded(env):
    cache = pack_module("nodes.encode_cache").EncodeCache(max_entries=2)
    for key in "abc":
        cache.put(key, key)
    assert len(cache) == 2 and cache.get("a") is None and cache.get("c") == "c"


def test_concat_puts_clip_tokens_after_the_adapters(qwen, sd15, encode):
    [[alone, _]], _ = encode(qwen, sd15, "a cube")
    [[both, extras]], _ = encode(qwen, sd15, "a cube", clip=FakeClip(768, 768), clip_mode="concat", llm_strength=2.0, clip_strength=0.5)
    assert both.shape == (1, 154, 768)
    torch.testing.assert_close(both[:, :77], alone * 2.0)
    torch.testing.assert_close(both[:, 77:], torch.full((1, 77, 768), 0.25))
    assert extras["pooled_output"].shape == (1, 768)  # CLIP's pooled rides along, harmless for SD1.5


def test_sdxl_pooled_blend_and_size_fields(env, qwen, sdxl, encode):
    [[context, extras]], _ = encode(qwen, sdxl, "a cube", width=832, height=1216, crop_w=8, crop_h=16, target_width=640, target_height=768)
    assert context.shape == (1, 77, 2048) and extras["pooled_output"].shape == (1, 1280)
    assert {k: extras[k] for k in ("width", "height", "crop_w", "crop_h", "target_width", "target_height")} == dict(
        width=832, height=1216, crop_w=8, crop_h=16, target_width=640, target_height=768)
    own = adapter_output(env[0], qwen, sdxl, "a cube").pooled
    [[_, blended]], _ = encode(qwen, sdxl, "a cube", clip=FakeClip(2048, 1280), pooled_blend=0.25)
    torch.testing.assert_close(blended["pooled_output"], own * 0.75 + 2.0 * 0.25)


def test_sdxl_fields_are_ignored_for_sd15_and_said_so(qwen, sd15, encode):
    [[_, extras]], info = encode(qwen, sd15, "a cube", width=512)
    assert "width" not in extras and "SDXL-only" in info


@pytest.mark.parametrize("adapter_fixture, clip_width, clip_pooled", [("sdxl", 768, 768), ("sd15", 2048, 1280)])
def test_adapter_target_must_match_the_connected_clip(env, qwen, encode, request, adapter_fixture, clip_width, clip_pooled):
    adapter = request.getfixturevalue(adapter_fixture)
    with pytest.raises(pack_module("adapter").AdapterMismatchError, match=r"the CLIP connected to LLM Diff Text Encode gives %d" % clip_width):
        encode(qwen, adapter, "a cube", clip=FakeClip(clip_width, clip_pooled))


def test_adapter_for_another_llm_names_both(env, qwen, encode):
    llama_adapter = env[1]["LLMDiffLoadAdapter"].execute("llama-sd15.safetensors").args[0]
    with pytest.raises(pack_module("adapter").AdapterMismatchError) as err:
        encode(qwen, llama_adapter, "a cube")
    message = str(err.value)
    assert "qwen2-seed0" in message or "Qwen2" in message
    assert "Llama" in message and "train an adapter for this LLM" in message


def test_concat_without_clip_says_what_to_do(qwen, sd15, encode):
    with pytest.raises(ValueError, match="connect the checkpoint's CLIP"):
        encode(qwen, sd15, "a cube", clip_mode="concat")


def test_half_copied_llm_folder_fails_clearly(env):
    with pytest.raises(pack_module("adapter").LLMLoadError, match="no weights"):
        env[1]["LLMDiffLoadLLM"].execute("half-copied", "auto")


@pytest.mark.parametrize("name, expected", [("truncated.safetensors", "is truncated.*re-download"),
                                            ("pickle.safetensors", r"pickle/PyTorch file; adapters must be \.safetensors")])
def test_broken_adapter_files_fail_clearly(env, name, expected):
    with pytest.raises(pack_module("adapter").AdapterFileError, match=expected):
        env[1]["LLMDiffLoadAdapter"].execute(name)


def test_models_are_held_by_comfyui_model_management(qwen, sd15):
    import comfy.model_management as mm

    for handle in (qwen, sd15):
        assert handle.patcher.load_device == mm.text_encoder_device()
        assert handle.patcher.offload_device == mm.text_encoder_offload_device()
        assert handle.patcher.model_size() > 0


def test_dtype_choice_on_cpu(env):
    choose = pack_module("nodes.handles").choose_llm_dtype
    cpu = torch.device("cpu")
    assert choose("auto", cpu) == torch.float32
    assert choose("fp16", cpu) == torch.float32  # fp16 kernels fail on a CPU
    assert choose("bf16", cpu) == torch.bfloat16
    with pytest.raises(ValueError, match="auto, bf16, fp16, fp32"):
        choose("int4", cpu)


def test_timestep_aware_adapter_uses_the_fallback_timestep_and_says_so(env, qwen, encode):
    pack, nodes = env
    adapter = nodes["LLMDiffLoadAdapter"].execute("qwen-sd15-timestep.safetensors").args[0]
    conditioning, info = encode(qwen, adapter, "a red circle")
    fallback = pack_module("adapter.model").FALLBACK_TIMESTEP
    assert f"fixed timestep {fallback:g}" in info
    with torch.no_grad():
        enc = pack_module("adapter").encode_prompts(qwen.loaded, adapter.config.template, ["a red circle"])
        expected = adapter.module(enc.hidden_states.float(), enc.attention_mask, timesteps=fallback).context
    torch.testing.assert_close(conditioning[0][0], expected)


def test_info_is_a_markdown_list(env, qwen, encode):
    """Preview Any renders Markdown: plain lines would run together into one paragraph there."""
    pack, nodes = env
    adapter = nodes["LLMDiffLoadAdapter"].execute("qwen-sd15-timestep.safetensors").args[0]
    _, info = encode(qwen, adapter, "a red circle")
    lines = info.splitlines()
    assert len(lines) >= 4 and all(line.startswith("- ") for line in lines), info
    assert lines[0].startswith("- LLM: ") and any(line.startswith("- prompt: ") for line in lines)
    # The shipped timestep-aware workflow already wires the Apply node: the note must not ask to add it.
    assert "with the MODEL passed through 'Apply LLM Diff Adapter (timestep-aware)', as in the shipped" in info, info
