"""LLM from CLIP loader and single files in Load LLM, in-process with real ComfyUI objects.

The LLM is a tiny Qwen2 built by ComfyUI's own loader and classes (support/comfy_tiny_llm.py, test-only
sizes); the full-size CLIPLoader path runs in tests/e2e/test_comfy_llm.py. The conditioning from it must
equal the conditioning from the same weights loaded as a Hugging Face folder, with one adapter file.
"""
from __future__ import annotations

import json
import struct

import pytest
import torch

from support.comfy_tiny_llm import parity_model, tiny_comfy_clip
from devkit.comfy_pack import load_pack, node_classes, pack_module

SMALL_ARCH = dict(width=64, heads=4, refiner_layers=1, resampler_layers=1)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """models/LLM (the parity Qwen2 folder), models/llm_adapters, models/text_encoders in a temp dir."""
    load_pack()
    import folder_paths

    lib = pack_module("adapter")
    root = tmp_path_factory.mktemp("models")
    llm_dir, adapter_dir, te_dir = root / "LLM", root / "llm_adapters", root / "text_encoders"
    for folder in (llm_dir, adapter_dir, te_dir):
        folder.mkdir()
    qwen = parity_model("qwen2")
    (llm_dir / "qwen").symlink_to(qwen)
    hf = lib.load_llm(qwen)
    template = lib.record_chat_template(lib.TemplateConfig(), hf.tokenizer)
    config = lib.AdapterConfig(llm=hf.info, target=lib.make_target("sd15"), template=template,
                               arch=lib.ArchConfig(**SMALL_ARCH))
    torch.manual_seed(0)
    lib.save_adapter(adapter_dir / "qwen-sd15.safetensors", lib.LLMDiffAdapter(config))

    saved = dict(folder_paths.folder_names_and_paths)
    folder_paths.folder_names_and_paths["LLM"] = ([str(llm_dir)], {"folder"})
    folder_paths.folder_names_and_paths["llm_adapters"] = ([str(adapter_dir)], {".safetensors"})
    folder_paths.folder_names_and_paths["text_encoders"] = ([str(te_dir)], set(folder_paths.supported_pt_extensions))
    yield node_classes(), qwen, root
    folder_paths.folder_names_and_paths.clear()
    folder_paths.folder_names_and_paths.update(saved)


@pytest.fixture(scope="module")
def clip(env):
    return tiny_comfy_clip(parity_model("qwen2"), "qwen2")


@pytest.fixture(scope="module")
def adapter(env):
    return env[0]["LLMDiffLoadAdapter"].execute("qwen-sd15.safetensors").args[0]


def encode(nodes, llm, adapter, text):
    return nodes["LLMDiffTextEncode"].execute(llm, adapter, text).args


def test_llm_from_clip_conditions_like_the_folder(env, clip, adapter):
    nodes, _, _ = env
    pack_module("nodes.encode").ENCODE_CACHE.clear()
    comfy = nodes["LLMDiffLLMFromCLIP"].execute(clip).args[0]
    folder = nodes["LLMDiffLoadLLM"].execute("qwen", "auto").args[0]
    assert comfy.patcher is clip.patcher  # ComfyUI's own memory management holds the weights
    assert (comfy.backend, comfy.partial_load, comfy.memory_mode) == ("comfyui", True, "auto")
    assert comfy.identity != folder.identity  # other numerics: never served each other's cache entries
    [[ours, _]], info = encode(nodes, comfy, adapter, "a red cube on a table")
    [[theirs, _]], _ = encode(nodes, folder, adapter, "a red cube on a table")
    assert ours.shape == (1, 77, 768) and ours.dtype == torch.float32
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
    assert "Qwen25_3B from CLIPLoader" in info and "reused" not in info


def test_encode_cache_follows_the_clips_weights(env, clip, adapter):
    nodes, _, _ = env
    pack_module("nodes.encode").ENCODE_CACHE.clear()
    first = nodes["LLMDiffLLMFromCLIP"].execute(clip).args[0]
    again = nodes["LLMDiffLLMFromCLIP"].execute(clip).args[0]
    assert first.identity == again.identity
    encode(nodes, first, adapter, "a cat")
    assert "reused the cached encoding" in encode(nodes, again, adapter, "a cat")[1]
    reloaded = nodes["LLMDiffLLMFromCLIP"].execute(tiny_comfy_clip(parity_model("qwen2"), "qwen2")).args[0]
    assert reloaded.identity != first.identity  # a new load may hold other weights


def test_patches_on_the_clip_reach_the_states_and_the_cache_key(env, clip, adapter):
    """A LoRA applied to the CLIP (LoraLoader patches the CLIP's ModelPatcher) changes the LLM's states."""
    nodes, _, _ = env
    pack_module("nodes.encode").ENCODE_CACHE.clear()
    plain = nodes["LLMDiffLLMFromCLIP"].execute(clip).args[0]
    patched_clip = clip.clone()
    key = "qwen25_3b.transformer.model.layers.0.mlp.down_proj.weight"
    assert patched_clip.add_patches({key: (torch.full((64, 128), 0.05),)}, 1.0) == [key]  # a "diff" patch
    patched = nodes["LLMDiffLLMFromCLIP"].execute(patched_clip).args[0]
    assert patched.identity != plain.identity
    [[with_patch, _]], info = encode(nodes, patched, adapter, "a cat")
    assert "reused" not in info
    [[without, _]], _ = encode(nodes, plain, adapter, "a cat")  # ComfyUI restores the weights for the plain patcher
    [[reference, _]], _ = encode(nodes, nodes["LLMDiffLoadLLM"].execute("qwen", "auto").args[0], adapter, "a cat")
    torch.testing.assert_close(without, reference, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(with_patch, without, atol=1e-4)
    [[again, _]], _ = encode(nodes, patched, adapter, "a cat")
    torch.testing.assert_close(again, with_patch)


def test_memory_mode_is_passed_on(env, clip):
    nodes, _, _ = env
    assert nodes["LLMDiffLLMFromCLIP"].execute(clip, "unload_after").args[0].memory_mode == "unload_after"
    with pytest.raises(ValueError, match="memory_mode"):
        nodes["LLMDiffLLMFromCLIP"].execute(clip, "sometimes")


def test_a_clip_without_an_llm_is_refused_clearly(env):
    """SD1.5's CLIP-L (tiny sizes through ComfyUI's own config override) is not a decoder-only LLM."""
    import comfy.sd
    import comfy.sd1_clip

    class Target:
        params = {}
        clip = comfy.sd1_clip.SD1ClipModel
        tokenizer = comfy.sd1_clip.SD1Tokenizer

    tiny = {"num_hidden_layers": 1, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2,
            "projection_dim": 32}
    sd15_clip = comfy.sd.CLIP(Target(), model_options={"clip_l_model_config": tiny})
    node = env[0]["LLMDiffLLMFromCLIP"]
    with pytest.raises(ValueError, match="no decoder-only LLM.*CLIPTextModel.*CLIPLoader"):
        node.execute(sd15_clip)
    with pytest.raises(ValueError, match="needs a CLIP"):
        node.execute(object())


# ---- single files in models/text_encoders -----------------------------------------------------------


def write_header_only(path, tensors: dict[str, list[int]]):
    """A safetensors file whose header names tensors of these shapes (only the header is ever read here)."""
    header = {name: {"dtype": "F16", "shape": shape, "data_offsets": [0, 0]} for name, shape in tensors.items()}
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)


@pytest.fixture(scope="module")
def text_encoder_files(env):
    te_dir = env[2] / "text_encoders"
    write_header_only(te_dir / "qwen_2.5_vl_3b.safetensors", {"model.layers.0.self_attn.k_proj.bias": [256],
                                                                "model.layers.0.post_attention_layernorm.weight": [2048]})
    write_header_only(te_dir / "gemma_2_2b.sft", {"model.layers.0.post_feedforward_layernorm.weight": [2304]})
    write_header_only(te_dir / "clip_l.safetensors", {"text_model.encoder.layers.0.mlp.fc1.weight": [3072, 768]})
    write_header_only(te_dir / "t5xxl.safetensors", {"encoder.block.23.layer.1.DenseReluDense.wi_1.weight": [10240, 4096]})
    (te_dir / "garbage.safetensors").write_bytes(b"\xff" * 64)
    (te_dir / "qwen.pt").write_bytes(b"pickle")  # never listed: never loaded
    return te_dir


def test_load_llm_lists_llm_files_beside_folders(env, text_encoder_files):
    nodes = env[0]
    options = nodes["LLMDiffLoadLLM"].GET_SCHEMA().get_v1_info(nodes["LLMDiffLoadLLM"]).input["required"]["llm_name"][1]["options"]
    assert options == ["qwen", "text_encoders/gemma_2_2b.sft", "text_encoders/qwen_2.5_vl_3b.safetensors"]


def test_single_file_choices_resolve_and_fail_clearly(env, text_encoder_files):
    files = pack_module("nodes.llm_files")
    assert files.resolve_llm_file("qwen") is None  # a folder, as saved workflows have it
    assert files.resolve_llm_file("text_encoders/qwen_2.5_vl_3b.safetensors") == str(text_encoder_files / "qwen_2.5_vl_3b.safetensors")
    with pytest.raises(ValueError, match="recognises it as CLIP_L.*Hugging Face folder"):
        files.resolve_llm_file("text_encoders/clip_l.safetensors")
    with pytest.raises(ValueError, match="does not recognise its weight names"):
        files.resolve_llm_file("text_encoders/garbage.safetensors")
    with pytest.raises(FileNotFoundError, match="text encoder file 'gone.safetensors' was not found"):
        files.resolve_llm_file("text_encoders/gone.safetensors")
    with pytest.raises(ValueError, match="points outside"):
        files.resolve_llm_file("text_encoders/../LLM/qwen/model.safetensors")
    with pytest.raises(ValueError, match="8/4-bit loading is for Hugging Face folders"):
        env[0]["LLMDiffLoadLLM"].execute("text_encoders/qwen_2.5_vl_3b.safetensors", "auto", "auto", "8bit")


def test_a_models_llm_folder_named_like_a_file_choice_keeps_meaning_the_folder(env, text_encoder_files):
    nodes, qwen, root = env
    grouped = root / "LLM" / "text_encoders"
    grouped.mkdir()
    try:
        (grouped / "qwen_2.5_vl_3b.safetensors").symlink_to(qwen)  # an (odd) folder name from before this feature
        files = pack_module("nodes.llm_files")
        assert files.resolve_llm_file("text_encoders/qwen_2.5_vl_3b.safetensors") is None
        handle = nodes["LLMDiffLoadLLM"].execute("text_encoders/qwen_2.5_vl_3b.safetensors", "auto").args[0]
        assert handle.backend == "transformers"
    finally:
        (grouped / "qwen_2.5_vl_3b.safetensors").unlink()
        grouped.rmdir()
