"""Node inputs that used to slip through: a replaced adapter file or LLM folder, a lone surrogate in a prompt,
NaN strengths, and conditioning that is not finite. Real ComfyUI modules and the real adapter library,
on a tiny random Qwen2 with a real tokenizer (as in test_nodes_encode.py)."""
from __future__ import annotations

import os
import shutil

import pytest
import torch

from support.tiny_models import make_tiny_llm
from test_nodes_pack import load_pack, node_classes, pack_module

SMALL_ARCH = dict(width=64, heads=4, refiner_layers=1, resampler_layers=1)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A private models/ tree (a copied LLM folder, so the test may replace its files) registered with folder_paths."""
    load_pack()
    import folder_paths

    lib = pack_module("adapter")
    root = tmp_path_factory.mktemp("models")
    llm_dir, adapter_dir = root / "LLM" / "tiny-qwen2", root / "llm_adapters"
    shutil.copytree(make_tiny_llm(family="qwen2"), llm_dir)
    adapter_dir.mkdir()

    def write_adapter(name: str, seed: int, poison: bool = False):
        info = lib.load_llm(llm_dir).info
        config = lib.AdapterConfig(llm=info, target=lib.make_target("sd15"), arch=lib.ArchConfig(**SMALL_ARCH))
        torch.manual_seed(seed)
        module = lib.LLMDiffAdapter(config)
        if poison:  # a diverged training run's weights
            with torch.no_grad():
                next(p for n, p in module.named_parameters() if n.startswith("context_head")).fill_(float("nan"))
        lib.save_adapter(adapter_dir / name, module)

    write_adapter("a.safetensors", seed=0)
    write_adapter("nan.safetensors", seed=0, poison=True)
    saved = dict(folder_paths.folder_names_and_paths)
    folder_paths.folder_names_and_paths["LLM"] = ([str(llm_dir.parent)], {"folder"})
    folder_paths.folder_names_and_paths["llm_adapters"] = ([str(adapter_dir)], {".safetensors"})
    yield node_classes(), write_adapter, llm_dir
    folder_paths.folder_names_and_paths.clear()
    folder_paths.folder_names_and_paths.update(saved)


@pytest.fixture(scope="module")
def llm(env):
    return env[0]["LLMDiffLoadLLM"].execute("tiny-qwen2", "auto").args[0]


@pytest.fixture
def encode(env):
    pack_module("nodes.encode").ENCODE_CACHE.clear()
    return lambda *args, **kwargs: env[0]["LLMDiffTextEncode"].execute(*args, **kwargs).args


def fingerprint(cls, **inputs):
    """What ComfyUI 0.3.75's execution.IsChangedCache does: call fingerprint_inputs only where the node overrides it."""
    from comfy_api.internal import first_real_override

    override = first_real_override(cls, "fingerprint_inputs")
    assert override is not None, f"{cls.__name__} does not fingerprint its inputs: ComfyUI would reuse its cached output"
    return override(**inputs)


# ---------------------------------------------------------------------------------------------
# a file replaced under the same name is loaded again


def test_replaced_adapter_file_changes_the_fingerprint_and_the_weights(env, llm, encode):
    nodes, write_adapter, _ = env
    load = nodes["LLMDiffLoadAdapter"]
    before = fingerprint(load, adapter_name="a.safetensors")
    assert fingerprint(load, adapter_name="a.safetensors") == before  # unchanged file: ComfyUI keeps its cache
    old = load.execute("a.safetensors").args[0]
    [[old_context, _]], _ = encode(llm, old, "a red cube")

    write_adapter("a.safetensors", seed=1)  # a newly trained file, same name
    after = fingerprint(load, adapter_name="a.safetensors")
    assert after != before
    new = load.execute("a.safetensors").args[0]
    assert new.identity != old.identity  # the encode cache's key moves with the file
    [[new_context, _]], info = encode(llm, new, "a red cube")
    assert "reused the cached encoding" not in info
    assert not torch.allclose(old_context, new_context)


def test_replaced_llm_weights_change_the_fingerprint_and_identity(env, llm):
    nodes, _, llm_dir = env
    load = nodes["LLMDiffLoadLLM"]
    before = fingerprint(load, llm_name="tiny-qwen2", dtype="auto")
    shard = next(llm_dir.glob("*.safetensors"))
    data = shard.read_bytes()
    shard.unlink()
    shard.write_bytes(data)  # replaced (config.json untouched): a new file with the same name
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 1_000_000))
    assert fingerprint(load, llm_name="tiny-qwen2", dtype="auto") != before
    again = load.execute("tiny-qwen2", "auto").args[0]
    assert again.identity != llm.identity


def test_missing_files_fingerprint_without_raising(env):
    nodes = env[0]
    assert fingerprint(nodes["LLMDiffLoadAdapter"], adapter_name="gone.safetensors") == "unresolved:gone.safetensors"
    assert fingerprint(nodes["LLMDiffLoadLLM"], llm_name="gone", dtype="auto") == "unresolved:gone"


# ---------------------------------------------------------------------------------------------
# a lone surrogate in the prompt (what a browser's JSON.stringify can send)


def test_lone_surrogate_is_replaced_and_reported(env, llm, encode):
    adapter = env[0]["LLMDiffLoadAdapter"].execute("a.safetensors").args[0]
    [[context, _]], info = encode(llm, adapter, "a red \ud83d cube")
    [[expected, _]], _ = encode(llm, adapter, "a red \ufffd cube")
    torch.testing.assert_close(context, expected)
    assert "1 invalid character(s) in the prompt (unpaired UTF-16 surrogates, at character position 6) were " \
           "replaced with U+FFFD" in info


# ---------------------------------------------------------------------------------------------
# NaN and infinite numbers, and conditioning that is not finite


@pytest.mark.parametrize("name", ["llm_strength", "clip_strength", "pooled_blend"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_numeric_inputs_are_refused_by_name(env, llm, encode, name, value):
    adapter = env[0]["LLMDiffLoadAdapter"].execute("a.safetensors").args[0]
    with pytest.raises(ValueError, match=rf"{name} is {value}, not a finite number"):
        encode(llm, adapter, "a red cube", **{name: value})


def test_non_finite_conditioning_is_refused_naming_the_adapter(env, llm, encode):
    adapter = env[0]["LLMDiffLoadAdapter"].execute("nan.safetensors").args[0]
    with pytest.raises(ValueError, match=r"NaN or infinite values, produced by the adapter nan.safetensors"):
        encode(llm, adapter, "a red cube")
