"""Memory options: where the LLM and the adapter are after each prompt, as ComfyUI's model management sees them.

CPU only here: ComfyUI's load and offload devices are both the CPU, so weights do not physically
move, but ComfyUI still keeps its books: `current_loaded_models` (what it holds as loaded),
`patcher.loaded_size()` (bytes it counts on the load device), `patcher.model.device` (where it
last put the model) and the `force_full_load` / `memory_required` it is asked for. Those are what
the tests observe. That the bytes really leave VRAM needs a GPU (see docs/nodes.md, "Memory").
"""
from __future__ import annotations

import dataclasses
import types

import pytest
import torch

from devkit.comfy_pack import load_pack, pack_module
from support.node_models import comfy_clip, is_loaded, llm, load_calls, qwen_sd15_models  # noqa: F401  (fixtures; env = qwen_sd15_models)


@pytest.fixture(scope="module")
def adapter(env):
    return env["LLMDiffLoadAdapter"].execute("qwen-sd15.safetensors").args[0]


@pytest.fixture(autouse=True)
def fresh_state():
    """Each test starts with nothing loaded and an empty encode cache."""
    load_pack()
    import comfy.model_management as mm

    pack_module("nodes.encode").ENCODE_CACHE.clear()
    mm.unload_all_models()
    yield
    mm.unload_all_models()


def where(patcher) -> tuple[bool, int, str]:
    """(held as loaded by ComfyUI, bytes it counts on the load device, the device it last put the model on)."""
    return is_loaded(patcher), patcher.loaded_size(), str(patcher.model.device)


def encode(env, llm, adapter, text):
    return env["LLMDiffTextEncode"].execute(llm, adapter, text).args


@pytest.mark.parametrize("mode", ["auto", "keep_loaded", "unload_after"])
def test_where_each_model_is_after_each_prompt(env, llm, adapter, load_calls, mode):
    llm = dataclasses.replace(llm, memory_mode=mode)
    memory = pack_module("nodes.memory")
    loaded = (True, llm.patcher.model_size(), str(llm.patcher.load_device))
    unloaded = (False, 0, str(llm.patcher.offload_device))
    adapter_loaded = (True, adapter.patcher.model_size(), str(adapter.patcher.load_device))
    expected_llm = unloaded if mode == "unload_after" else loaded

    for prompt in ("a red cube", "a blue ball on grass"):
        encode(env, llm, adapter, prompt)
        assert where(llm.patcher) == expected_llm, prompt
        assert where(adapter.patcher) == adapter_loaded, prompt  # the adapter is small: it stays, in every mode
    # What ComfyUI was asked for: a transformers LLM is always loaded in full, with its working memory.
    assert [(models, full) for models, _, full in load_calls] == [([llm.patcher], True), ([adapter.patcher], True)] * 2
    shape = memory.llm_shape(llm)
    tokens = pack_module("adapter").tokenize_prompts(llm.loaded.tokenizer, adapter.config.template, ["a red cube"]).input_ids.shape[1]
    assert load_calls[0][1] == memory.encode_working_memory(shape, tokens)
    assert load_calls[1][1] == memory.adapter_working_memory(shape, tokens)

    calls_before = len(load_calls)
    encode(env, llm, adapter, "a red cube")  # cached: nothing is loaded, nothing moves
    assert len(load_calls) == calls_before
    assert where(llm.patcher) == expected_llm and where(adapter.patcher) == adapter_loaded


def test_the_loader_node_carries_the_memory_mode(env):
    handle = env["LLMDiffLoadLLM"].execute("tiny-qwen2", "auto", memory_mode="unload_after").args[0]
    assert handle.memory_mode == "unload_after" and handle.partial_load is False
    with pytest.raises(ValueError, match="memory_mode must be one of auto, keep_loaded, unload_after"):
        env["LLMDiffLoadLLM"].execute("tiny-qwen2", "auto", memory_mode="pinned")


def test_an_llm_unloaded_after_a_prompt_encodes_the_next_one_the_same(env, llm, adapter):
    keep, drop = dataclasses.replace(llm, memory_mode="keep_loaded"), dataclasses.replace(llm, memory_mode="unload_after")
    [[first, _]], _ = encode(env, drop, adapter, "a green sphere")
    assert not where(llm.patcher)[0]
    pack_module("nodes.encode").ENCODE_CACHE.clear()
    [[again, _]], _ = encode(env, keep, adapter, "a green sphere")
    assert where(llm.patcher)[0]
    torch.testing.assert_close(again, first)


def test_a_partially_evicted_llm_is_loaded_in_full_again(env, llm, adapter):
    """ComfyUI may unload part of a plain-torch LLM when the UNet needs memory; the next encode restores all of it."""
    import comfy.model_management as mm

    [[first, _]], _ = encode(env, llm, adapter, "a yellow lamp")
    [entry] = [m for m in mm.current_loaded_models if m.model is llm.patcher]
    size = llm.patcher.model_size()
    # What free_memory does under pressure: a partial unload (the smallest modules first; 64 KiB stops before the embedding).
    assert entry.model_unload(memory_to_free=64 * 1024) is False
    assert 0 < llm.patcher.loaded_size() < size and llm.patcher.model.model_lowvram
    pack_module("nodes.encode").ENCODE_CACHE.clear()
    [[again, _]], _ = encode(env, llm, adapter, "a yellow lamp")
    assert llm.patcher.loaded_size() == size and not llm.patcher.model.model_lowvram
    torch.testing.assert_close(again, first)


@pytest.mark.parametrize("partial_load, mode, full", [
    (False, "auto", True), (False, "keep_loaded", True), (False, "unload_after", True),
    (True, "auto", False), (True, "keep_loaded", True), (True, "unload_after", False),
])
def test_partial_loading_only_where_comfyui_casts_the_weights(load_calls, partial_load, mode, full):
    """comfy.ops layers (ComfyUI's own LLMs, LLMHandle.partial_load) may be split across devices unless
    keep_loaded asks for a full load; plain torch modules (transformers) never are."""
    import comfy.model_patcher
    import comfy.ops

    memory = pack_module("nodes.memory")
    module = torch.nn.Sequential(comfy.ops.disable_weight_init.Linear(8, 8), comfy.ops.disable_weight_init.Linear(8, 8))
    patcher = comfy.model_patcher.ModelPatcher(module, torch.device("cpu"), torch.device("cpu"))
    handle = types.SimpleNamespace(patcher=patcher, memory_mode=mode, partial_load=partial_load, loaded=types.SimpleNamespace())
    with memory.llm_on_device(handle, memory_required=123):
        assert is_loaded(patcher)
    assert load_calls == [([patcher], 123, full)]
    assert is_loaded(patcher) == (mode != "unload_after")


def test_unload_after_also_unloads_when_the_run_fails(llm):
    memory = pack_module("nodes.memory")
    drop = dataclasses.replace(llm, memory_mode="unload_after")
    with pytest.raises(RuntimeError, match="stop"):
        with memory.llm_on_device(drop):
            assert is_loaded(llm.patcher)
            raise RuntimeError("stop")
    assert not is_loaded(llm.patcher)


def test_working_memory_covers_the_states_the_run_really_makes(env, llm, adapter):
    memory = pack_module("nodes.memory")
    shape = memory.llm_shape(llm)
    assert (shape.num_layers, shape.hidden_size, shape.intermediate_size, shape.num_heads, shape.bytes_per_value) == (2, 64, 128, 4, 4)
    encoded = pack_module("adapter").encode_prompts(llm.loaded, adapter.config.template, ["a cube " * 40])
    tokens = encoded.hidden_states.shape[2]
    # the stacked [1, L+1, T, H] tensor plus the per-block list it was stacked from
    assert memory.encode_working_memory(shape, tokens) >= 2 * encoded.hidden_states.nbytes
    assert memory.adapter_working_memory(shape, tokens) >= encoded.hidden_states.float().nbytes
    assert memory.encode_working_memory(shape, 2 * tokens) > memory.encode_working_memory(shape, tokens)
    kv_cache = 2 * shape.num_layers * tokens * shape.hidden_size * shape.bytes_per_value
    assert memory.generate_working_memory(shape, tokens, head_bytes=1000) >= kv_cache + 3 * shape.vocab_size * 4 + 1000


def test_encode_cache_is_bounded_by_bytes_and_entries():
    EncodeCache = pack_module("nodes.encode_cache").EncodeCache
    mib = torch.zeros(256, 1024)  # 1 MiB of fp32
    cache = EncodeCache(max_entries=10, max_bytes=3 * mib.nbytes)
    for key in "abcd":
        cache.put(key, (mib.clone(), None, "info"))
    assert len(cache) == 3 and cache.nbytes == 3 * mib.nbytes and cache.get("a") is None  # oldest evicted by bytes
    cache.get("b")  # b becomes the most recent
    cache.put("e", (mib.clone(),))
    assert cache.get("c") is None and cache.get("b") is not None
    cache.put("huge", (torch.zeros(4 * 256, 1024),))  # larger than the whole bound: not kept, nothing evicted
    assert cache.get("huge") is None and len(cache) == 3
    small = EncodeCache(max_entries=2)
    for key in "xyz":
        small.put(key, torch.zeros(1))
    assert len(small) == 2 and small.get("x") is None


def test_cached_tensors_are_detached_copies_on_the_storage_device():
    EncodeCache = pack_module("nodes.encode_cache").EncodeCache
    cache = EncodeCache(storage_device=lambda: torch.device("meta"))  # a device the value is not on
    source = torch.ones(2, 3, requires_grad=True)
    stored = cache.put("k", {"context": source * 2, "pooled": None})
    assert stored["context"].device.type == "meta" and not stored["context"].requires_grad
    assert cache.get("k")["context"].device.type == "meta" and cache.get("k")["pooled"] is None


def test_the_encode_nodes_cache_holds_its_tensors_on_the_intermediate_device(env, llm, adapter):
    import comfy.model_management as mm

    encode(env, llm, adapter, "a pink flower")
    cache = pack_module("nodes.encode").ENCODE_CACHE
    assert cache.storage_device == mm.intermediate_device()
    [entry] = [value for value, _ in cache._items.values()]
    assert entry.context.device == mm.intermediate_device() and not entry.context.requires_grad
    assert cache.nbytes == entry.context.nbytes


def test_why_a_transformers_llm_is_never_partially_loaded():
    """ComfyUI's partial load, with `meta` standing in for the GPU: the layers that do not fit stay on the CPU.
    comfy.ops layers cast their weights to the input's device on the fly, so ComfyUI's own models still run;
    a transformers model's plain torch layers do not, so its forward fails: hence force_full_load for it."""
    import comfy.model_patcher
    import comfy.ops
    from transformers import Qwen2Config, Qwen2Model

    gpu, cpu = torch.device("meta"), torch.device("cpu")
    config = Qwen2Config(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    transformers_model = Qwen2Model(config).eval()
    patcher = comfy.model_patcher.ModelPatcher(pack_module("nodes.handles").ModuleHolder(transformers_model), gpu, cpu)
    patcher.patch_model(device_to=gpu, lowvram_model_memory=patcher.model_size() // 2)
    assert {p.device.type for p in transformers_model.parameters()} == {"cpu", "meta"}  # split across devices
    with pytest.raises(RuntimeError, match="device"):
        transformers_model(input_ids=torch.zeros(1, 4, dtype=torch.long, device=gpu))

    ops = comfy.ops.disable_weight_init
    comfy_model = torch.nn.Sequential(ops.Linear(64, 64), ops.Linear(64, 64))
    patcher = comfy.model_patcher.ModelPatcher(comfy_model, gpu, cpu)
    patcher.patch_model(device_to=gpu, lowvram_model_memory=patcher.model_size() // 2)
    assert patcher.loaded_size() < patcher.model_size()  # partially loaded ...
    assert comfy_model(torch.zeros(1, 64, device=gpu)).device == gpu  # ... and it runs


@pytest.mark.parametrize("mode", ["auto", "keep_loaded", "unload_after"])
def test_comfyui_implemented_llm_memory_modes(env, adapter, comfy_clip, load_calls, mode):
    """Through LLM from CLIP loader the CLIP's own patcher is what ComfyUI loads: partially where allowed."""
    llm = env["LLMDiffLLMFromCLIP"].execute(comfy_clip, mode).args[0]
    assert llm.patcher is comfy_clip.patcher and llm.partial_load
    encode(env, llm, adapter, f"a {mode} cube")
    assert load_calls[0][0] == [comfy_clip.patcher]
    assert load_calls[0][2] is (mode == "keep_loaded")  # force_full_load only when asked to keep it loaded
    assert load_calls[0][1] == pack_module("nodes.memory").encode_working_memory(
        pack_module("nodes.memory").llm_shape(llm), pack_module("adapter").tokenize_prompts(
            llm.loaded.tokenizer, adapter.config.template, [f"a {mode} cube"]).input_ids.shape[1])
    assert where(comfy_clip.patcher)[0] == (mode != "unload_after")
    assert where(adapter.patcher)[0]
