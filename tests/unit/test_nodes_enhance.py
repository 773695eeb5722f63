"""LLMDiffEnhancePrompt's `execute` on the tiny Qwen2 (real tokenizer), with ComfyUI's progress, interruption and memory."""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest

from devkit.tiny_models import make_tiny_llm
from devkit.comfy_pack import load_pack, pack_module
from support.node_models import comfy_clip, is_loaded, llm, load_calls, qwen_sd15_models  # noqa: F401  (fixtures; env = qwen_sd15_models)

RANDOM = dict(temperature=1.0, top_p=1.0)  # a random LLM's distribution is nearly flat: seeds must matter


@pytest.fixture(autouse=True)
def nothing_loaded():
    load_pack()
    import comfy.model_management as mm

    mm.unload_all_models()
    yield
    mm.interrupt_current_processing(False)
    mm.unload_all_models()


@pytest.fixture
def enhance(env):  # noqa: F811
    return lambda llm, text, seed=0, max_new_tokens=6, instruction="Describe it.", **kw: env["LLMDiffEnhancePrompt"].execute(  # noqa: E731,F811
        llm, text, instruction, seed, max_new_tokens, **{**RANDOM, **kw}).args[0]


@pytest.fixture
def progress(monkeypatch):
    """(value, total) of every ProgressBar update, through ComfyUI's global hook."""
    import comfy.utils

    seen = []
    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK", lambda value, total, preview, node_id=None: seen.append((value, total)))
    return seen


def test_deterministic_for_a_seed(llm, enhance):  # noqa: F811
    first = enhance(llm, "a red cube", seed=5)
    assert isinstance(first, str) and first
    assert enhance(llm, "a red cube", seed=5) == first
    assert enhance(llm, "a red cube", seed=6) != first


def test_progress_counts_tokens_and_max_new_tokens_is_respected(llm, enhance, progress):  # noqa: F811
    text = enhance(llm, "a cat", max_new_tokens=4)
    assert progress[-1] == (4, 4) and [value for value, _ in progress[:4]] == [1, 2, 3, 4]
    assert len(llm.loaded.tokenizer(text, add_special_tokens=False)["input_ids"]) <= 4 + 2  # re-encoding may split a piece


def test_cancel_stops_between_tokens_and_unload_after_still_unloads(llm, enhance, progress, monkeypatch):  # noqa: F811
    import comfy.model_management as mm
    import comfy.utils

    drop = dataclasses.replace(llm, memory_mode="unload_after")

    def cancel_at_two(value, total, preview, node_id=None):
        progress.append((value, total))
        if value == 2:
            mm.interrupt_current_processing(True)  # what the Cancel button does

    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK", cancel_at_two)
    with pytest.raises(mm.InterruptProcessingException):
        enhance(drop, "a cat", max_new_tokens=50)
    assert progress == [(1, 50), (2, 50)]
    assert not is_loaded(llm.patcher)


@pytest.mark.parametrize("mode, stays", [("auto", True), ("keep_loaded", True), ("unload_after", False)])
def test_the_llm_is_where_its_memory_mode_says_after_generating(llm, enhance, mode, stays):  # noqa: F811
    enhance(dataclasses.replace(llm, memory_mode=mode), "a dog", max_new_tokens=2)
    assert is_loaded(llm.patcher) == stays
    assert llm.patcher.loaded_size() == (llm.patcher.model_size() if stays else 0)


def test_an_llm_without_a_generation_head_fails_before_loading(env, enhance):  # noqa: F811
    import folder_paths

    folder = Path(folder_paths.get_folder_paths("LLM")[0]) / "untied-qwen2"
    if not folder.exists():
        shutil.copytree(make_tiny_llm(family="qwen2"), folder)
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": False}))
    untied = env["LLMDiffLoadLLM"].execute("untied-qwen2", "auto").args[0]
    with pytest.raises(pack_module("adapter").LLMLoadError, match="cannot generate text: its output layer is not tied"):
        enhance(untied, "a cube")
    assert not is_loaded(untied.patcher)


def test_empty_text_is_refused(llm, enhance):  # noqa: F811
    with pytest.raises(ValueError, match="text is empty"):
        enhance(llm, "   ")


def test_comfyui_is_told_the_generation_working_memory(llm, enhance, load_calls):  # noqa: F811
    memory = pack_module("nodes.memory")
    generate = pack_module("adapter.generate")
    enhance(llm, "a tree", max_new_tokens=20, instruction="Describe it.")
    prompt = len(generate.build_generation_prompt(llm.loaded.tokenizer, "Describe it.", "a tree"))
    expected = memory.generate_working_memory(memory.llm_shape(llm), prompt + 20, head_bytes=0)  # tied: no extra head
    assert load_calls == [([llm.patcher], expected, True)]


def test_a_comfyui_implemented_llm_generates_from_its_tied_embedding(env, enhance, comfy_clip, load_calls, progress):  # noqa: F811
    """LLM from CLIP loader: ComfyUI's decoder (no KV cache) and its tied embedding as the head; same seed, same text."""
    llm = env["LLMDiffLLMFromCLIP"].execute(comfy_clip, "unload_after").args[0]
    first = enhance(llm, "a red cube", seed=3, max_new_tokens=5)
    assert first and enhance(llm, "a red cube", seed=3, max_new_tokens=5) == first
    assert progress[-1] == (5, 5)
    assert [(models, full) for models, _, full in load_calls] == [([comfy_clip.patcher], False)] * 2  # partial allowed
    assert not is_loaded(comfy_clip.patcher)
