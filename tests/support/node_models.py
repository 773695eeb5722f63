"""Models folders and loaded models for the node unit tests (pytest fixtures, imported by the test files).

Two sets, each registered as the fixture `env`; a test file imports the one it needs:
    node_models        models/LLM (tiny Qwen2 and Llama, a half-copied folder) and models/llm_adapters (SD1.5,
                       SDXL, other-LLM and timestep-aware adapters, a truncated file, a renamed pickle); env = (pack, nodes)
    qwen_sd15_models   models/LLM with the tiny Qwen2 and one SD1.5 adapter for it; env = nodes
and what is built on them: `qwen` (node_models' Qwen2 through Load LLM), `llm` (qwen_sd15_models' Qwen2),
`comfy_clip` (the same weights in ComfyUI's own implementation), `load_calls` (a spy on ComfyUI's loads),
and `is_loaded(patcher)` (whether ComfyUI holds a model as loaded).
"""
from __future__ import annotations

import pytest
import torch

from devkit.comfy_pack import load_pack, node_classes, pack_module
from devkit.tiny_models import make_tiny_llm

SMALL_ARCH = dict(width=64, heads=4, refiner_layers=1, resampler_layers=1)


def is_loaded(patcher) -> bool:
    """Whether ComfyUI's model management currently holds this model as loaded (in `current_loaded_models`)."""
    import comfy.model_management as mm

    return any(loaded.model is patcher for loaded in mm.current_loaded_models)


@pytest.fixture(scope="module", name="env")
def node_models(tmp_path_factory):
    """models/LLM and models/llm_adapters in a temp dir, registered with ComfyUI's folder_paths."""
    pack = load_pack()
    import folder_paths

    lib = pack_module("adapter")
    root = tmp_path_factory.mktemp("models")
    llm_dir, adapter_dir = root / "LLM", root / "llm_adapters"
    adapter_dir.mkdir(parents=True)
    llm_dir.mkdir()
    qwen, llama = make_tiny_llm(family="qwen2"), make_tiny_llm(family="llama")
    (llm_dir / "tiny-qwen2").symlink_to(qwen)
    half = llm_dir / "half-copied"  # config and tokenizer copied, weights not
    half.mkdir()
    for item in qwen.iterdir():
        if not item.name.endswith(".safetensors"):
            (half / item.name).write_bytes(item.read_bytes())

    def make_adapter(llm_path, target, name, **arch):
        info = lib.load_llm(llm_path).info
        config = lib.AdapterConfig(llm=info, target=lib.make_target(target), arch=lib.ArchConfig(**SMALL_ARCH, **arch))
        torch.manual_seed(0)
        lib.save_adapter(adapter_dir / name, lib.LLMDiffAdapter(config))

    make_adapter(qwen, "sd15", "qwen-sd15.safetensors")
    make_adapter(qwen, "sdxl", "qwen-sdxl.safetensors")
    make_adapter(llama, "sd15", "llama-sd15.safetensors")
    make_adapter(qwen, "sd15", "qwen-sd15-timestep.safetensors", timestep_aware=True)
    data = (adapter_dir / "qwen-sd15.safetensors").read_bytes()
    (adapter_dir / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    torch.save({"weight": torch.zeros(2)}, adapter_dir / "pickle.safetensors")  # a renamed .pt; never loaded

    saved = dict(folder_paths.folder_names_and_paths)
    folder_paths.folder_names_and_paths["LLM"] = ([str(llm_dir)], {"folder"})
    folder_paths.folder_names_and_paths["llm_adapters"] = ([str(adapter_dir)], {".safetensors"})
    nodes = node_classes()
    yield pack, nodes
    folder_paths.folder_names_and_paths.clear()
    folder_paths.folder_names_and_paths.update(saved)


@pytest.fixture(scope="module")
def qwen(env):
    """The tiny Qwen2 through Load LLM, from `node_models`."""
    pack, nodes = env
    return nodes["LLMDiffLoadLLM"].execute("tiny-qwen2", "auto").args[0]


@pytest.fixture(scope="module", name="env")
def qwen_sd15_models(tmp_path_factory):
    """models/LLM with the tiny Qwen2 and models/llm_adapters with an SD1.5 adapter for it."""
    load_pack()
    import folder_paths

    lib = pack_module("adapter")
    root = tmp_path_factory.mktemp("models")
    (root / "LLM").mkdir()
    (root / "llm_adapters").mkdir()
    qwen = make_tiny_llm(family="qwen2")
    (root / "LLM" / "tiny-qwen2").symlink_to(qwen)
    config = lib.AdapterConfig(llm=lib.load_llm(qwen).info, target=lib.make_target("sd15"), arch=lib.ArchConfig(**SMALL_ARCH))
    torch.manual_seed(0)
    lib.save_adapter(root / "llm_adapters" / "qwen-sd15.safetensors", lib.LLMDiffAdapter(config))
    saved = dict(folder_paths.folder_names_and_paths)
    folder_paths.folder_names_and_paths["LLM"] = ([str(root / "LLM")], {"folder"})
    folder_paths.folder_names_and_paths["llm_adapters"] = ([str(root / "llm_adapters")], {".safetensors"})
    nodes = node_classes()
    yield nodes
    folder_paths.folder_names_and_paths.clear()
    folder_paths.folder_names_and_paths.update(saved)


@pytest.fixture(scope="module")
def llm(env):
    """The tiny Qwen2 through Load LLM (memory_mode auto), from `qwen_sd15_models`."""
    return env["LLMDiffLoadLLM"].execute("tiny-qwen2", "auto").args[0]


@pytest.fixture
def load_calls(monkeypatch):
    """Every mm.load_models_gpu call: (models, memory_required, force_full_load), still doing the real work."""
    import comfy.model_management as mm

    calls, real = [], mm.load_models_gpu

    def spy(models, memory_required=0, force_patch_weights=False, minimum_memory_required=None, force_full_load=False):
        calls.append((list(models), memory_required, force_full_load))
        return real(models, memory_required=memory_required, force_patch_weights=force_patch_weights,
                    minimum_memory_required=minimum_memory_required, force_full_load=force_full_load)

    monkeypatch.setattr(mm, "load_models_gpu", spy)
    return calls


@pytest.fixture(scope="module")
def comfy_clip(env):
    """The tiny Qwen2's weights in ComfyUI's own implementation, as CLIPLoader builds it (test-only sizes)."""
    from support.comfy_tiny_llm import tiny_comfy_clip

    return tiny_comfy_clip(make_tiny_llm(family="qwen2"), "qwen2")


class FakeClip:
    """Duck-types comfy.sd.CLIP's tokenize / encode_from_tokens with known outputs of a given width."""

    def __init__(self, width: int, pooled_dim: int):
        self.width, self.pooled_dim, self.texts = width, pooled_dim, []

    def tokenize(self, text):
        self.texts.append(text)
        return {"l": [[(1, 1.0)]]}

    def encode_from_tokens(self, tokens, return_pooled=False, return_dict=False):
        return {"cond": torch.full((1, 77, self.width), 0.5), "pooled_output": torch.full((1, self.pooled_dim), 2.0)}


@pytest.fixture
def comfy_models(tmp_path):
    """Empty models/LLM and models/llm_adapters in a temp dir, registered with ComfyUI's own folder_paths
    (restored afterwards); yields (llm_dir, adapter_dir)."""
    load_pack()
    import folder_paths

    llm_dir, adapter_dir = tmp_path / "LLM", tmp_path / "llm_adapters"
    llm_dir.mkdir()
    adapter_dir.mkdir()
    saved = dict(folder_paths.folder_names_and_paths)
    folder_paths.folder_names_and_paths["LLM"] = ([str(llm_dir)], {"folder"})
    folder_paths.folder_names_and_paths["llm_adapters"] = ([str(adapter_dir)], {".safetensors"})
    yield llm_dir, adapter_dir
    folder_paths.folder_names_and_paths.clear()
    folder_paths.folder_names_and_paths.update(saved)
