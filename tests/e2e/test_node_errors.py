"""Edge cases that must work and errors that must fail clearly, through a real ComfyUI's HTTP API.

Each failure must be a node error naming the problem and the fix, the server must keep running,
and the next, valid prompt must succeed. Graphs start from the shipped sd15_adapter workflow.
"""
from __future__ import annotations

import pytest

from test_workflows import PROMPT_A, load_api, nodes_of, pixels, set_prompt


@pytest.fixture
def api(comfy_sd15):
    return set_prompt(load_api(comfy_sd15, "sd15_adapter"), PROMPT_A)


def info_text(result, api) -> str:
    """What the workflow's Preview Any node shows for the positive encode node's `info` output."""
    [preview] = nodes_of(api, "PreviewAny")
    return "\n".join(result.outputs[preview]["text"])


def set_input(api, class_type, **values):
    for node_id in nodes_of(api, class_type):
        api[node_id]["inputs"].update(values)
    return api


def positive_encode(api) -> str:
    return next(n for n in nodes_of(api, "LLMDiffTextEncode") if api[n]["inputs"]["text"])


def test_empty_prompt_works(comfy_sd15, api):
    api[positive_encode(api)]["inputs"]["text"] = ""
    result = comfy_sd15.run(api, timeout=600)
    pixels(result)
    assert "0 of" in info_text(result, api)


def test_non_latin_and_emoji_work(comfy_sd15, api):
    api[positive_encode(api)]["inputs"]["text"] = "一只戴着帽子的猫 🐱🎩, кот в шляпе"
    pixels(comfy_sd15.run(api, timeout=600))


def test_prompt_over_budget_is_truncated_and_says_so(comfy_sd15, api):
    api[positive_encode(api)]["inputs"]["text"] = "a very detailed description of a castle " * 150
    result = comfy_sd15.run(api, timeout=600)
    pixels(result)
    assert "truncated:" in info_text(result, api)


def test_batch_of_two(comfy_sd15, api):
    set_input(api, "EmptyLatentImage", batch_size=2)
    images = pixels(comfy_sd15.run(api, timeout=600))
    assert images.shape[0] == 2


def assert_node_error(server, api, node_type: str, *phrases: str) -> None:
    """The run fails in `node_type` with a message holding every phrase; then a valid prompt still runs."""
    result = server.run(api, timeout=600)
    assert not result.ok
    assert result.error["kind"] == "execution", result.error_text
    assert result.error["node_type"] == node_type, result.error_text
    for phrase in phrases:
        assert phrase in result.error["exception_message"], result.error_text
    healthy = set_prompt(load_api(server, "sd15_adapter"), "a lighthouse at night")
    pixels(server.run(healthy, timeout=600))


def test_adapter_for_a_different_llm(comfy_sd15, api):
    set_input(api, "LLMDiffLoadAdapter", adapter_name="tiny-llama-sd15.safetensors")
    assert_node_error(comfy_sd15, api, "LLMDiffTextEncode", "hidden", "train an adapter for this LLM")


def test_sdxl_adapter_with_an_sd15_clip(comfy_sd15, api):
    set_input(api, "LLMDiffLoadAdapter", adapter_name="tiny-qwen2-sdxl.safetensors")
    api["clip"] = {"class_type": "CLIPLoader", "inputs": {"clip_name": "clip_l_random.safetensors", "type": "stable_diffusion", "device": "default"}}
    set_input(api, "LLMDiffTextEncode", clip=["clip", 0])
    assert_node_error(comfy_sd15, api, "LLMDiffTextEncode", "the CLIP connected", "768", "2048")


def test_half_copied_llm_folder(comfy_sd15, api):
    set_input(api, "LLMDiffLoadLLM", llm_name="broken-half-copied")
    assert_node_error(comfy_sd15, api, "LLMDiffLoadLLM", "no weights")


@pytest.mark.parametrize("name", ["broken-truncated.safetensors", "broken-pickle.safetensors"])
def test_broken_adapter_file(comfy_sd15, api, name):
    set_input(api, "LLMDiffLoadAdapter", adapter_name=name)
    assert_node_error(comfy_sd15, api, "LLMDiffLoadAdapter", name)


def test_path_outside_the_model_folder_is_rejected(comfy_sd15, api):
    """ComfyUI's own combo validation stops it before our resolver (unit-tested directly) is reached."""
    set_input(api, "LLMDiffLoadLLM", llm_name="../LLM/tiny-qwen2")
    result = comfy_sd15.run(api, timeout=120)
    assert not result.ok and result.status == "rejected", result.error_text
    pixels(comfy_sd15.run(set_prompt(load_api(comfy_sd15, "sd15_adapter"), PROMPT_A), timeout=600))
