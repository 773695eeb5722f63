"""Edge cases that must work and errors that must fail clearly, through a real ComfyUI's HTTP API.

Each failure must be a node error naming the problem and the fix, the server must keep running,
and the next, valid prompt must succeed. Graphs start from the shipped sd15_adapter workflow.
"""
from __future__ import annotations

import re

import numpy as np
import pytest

from support.workflows import PROMPT_A, load_api, nodes_of, pixels, set_prompt


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


def tokens_used(info: str) -> tuple[int, int]:
    """(prompt tokens used, budget) from the info line "prompt: N of B tokens used (...)"."""
    match = re.search(r"^prompt: (\d+) of (\d+) tokens used", info, re.MULTILINE)
    assert match, f"no token count in the info output:\n{info}"
    return int(match[1]), int(match[2])


def test_empty_prompt_works(comfy_sd15, api):
    api[positive_encode(api)]["inputs"]["text"] = ""
    result = comfy_sd15.run(api, timeout=600)
    pixels(result)
    assert tokens_used(info_text(result, api))[0] == 0


def test_non_latin_and_emoji_work(comfy_sd15, api):
    api[positive_encode(api)]["inputs"]["text"] = "一只戴着帽子的猫 🐱🎩, кот в шляпе"
    result = comfy_sd15.run(api, timeout=600)
    pixels(result)
    info = info_text(result, api)
    assert tokens_used(info)[0] > 0 and "truncated:" not in info, info


def test_prompt_over_budget_is_truncated_and_says_so(comfy_sd15, api):
    api[positive_encode(api)]["inputs"]["text"] = "a very detailed description of a castle " * 150
    result = comfy_sd15.run(api, timeout=600)
    pixels(result)
    info = info_text(result, api)
    used, budget = tokens_used(info)
    assert used == budget, info
    assert "truncated:" in info and "description of a castle" in info, info


def test_batch_of_two(comfy_sd15, api):
    set_input(api, "EmptyLatentImage", batch_size=2)
    images = pixels(comfy_sd15.run(api, timeout=600))
    assert images.shape[0] == 2
    assert not np.array_equal(images[0], images[1]), "both images of the batch are the same: the batch was not sampled"


def assert_node_error(server, api, node_type: str, *phrases: str) -> None:
    """The run fails in `node_type` with a message holding every phrase; then a valid prompt still runs."""
    result = server.run(api, timeout=600)
    assert not result.ok
    assert result.error["kind"] == "execution", result.error_text
    assert result.error["node_type"] == node_type, result.error_text
    for phrase in phrases:
        assert phrase in result.error["exception_message"], result.error_text
    # A prompt never run before, so the sampler really runs again rather than coming from ComfyUI's cache.
    healthy = set_prompt(load_api(server, "sd15_adapter"), f"a lighthouse at night, after {node_type} failed ({phrases[0]})")
    after = server.run(healthy, timeout=600)
    pixels(after)
    assert nodes_of(healthy, "KSampler")[0] not in after.cached_nodes


def test_adapter_for_a_different_llm(comfy_sd15, api):
    set_input(api, "LLMDiffLoadAdapter", adapter_name="tiny-llama-sd15.safetensors")
    # The tiny LLMs share hidden size and depth; the tokenizers differ. Both sides must be named.
    assert_node_error(comfy_sd15, api, "LLMDiffTextEncode", "LlamaForCausalLM", "Qwen2ForCausalLM", "tokenizer tokfp2:",
                      "train an adapter for this LLM")


def test_sdxl_adapter_with_an_sd15_clip(comfy_sd15, api):
    set_input(api, "LLMDiffLoadAdapter", adapter_name="tiny-qwen2-sdxl.safetensors")
    api["clip"] = {"class_type": "CLIPLoader", "inputs": {"clip_name": "clip_l_random.safetensors", "type": "stable_diffusion", "device": "default"}}
    set_input(api, "LLMDiffTextEncode", clip=["clip", 0])
    assert_node_error(comfy_sd15, api, "LLMDiffTextEncode", "the CLIP connected", "768", "2048")


SDXL_CLIP = {"class_type": "DualCLIPLoader", "inputs": {"clip_name1": "clip_l_random.safetensors",
                                                        "clip_name2": "clip_g_random.safetensors", "type": "sdxl"}}


def test_the_random_sdxl_clip_is_a_real_one(comfy_sd15):
    """Guards the test below: ComfyUI must map every CLIP-G key (unmapped keys stay uninitialised and
    encode to NaN or garbage silently), so the mismatch it reports is about widths, not a broken file."""
    graph = {"clip": SDXL_CLIP,
             "encode": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["clip", 0], "text": "a red cube"}},
             "show": {"class_type": "PreviewAny", "inputs": {"source": ["encode", 0]}}}
    result = comfy_sd15.run(graph, timeout=600)
    assert result.ok, result.error_text
    text = "\n".join(result.outputs["show"]["text"])
    assert "tensor(" in text and "pooled_output" in text, f"PreviewAny did not show the conditioning:\n{text[:2000]}"
    assert "nan" not in text and "inf" not in text, f"the SDXL CLIP encodes to non-finite values:\n{text[:2000]}"
    assert "clip missing" not in comfy_sd15.log_text(), "ComfyUI could not map the CLIP-L/CLIP-G keys"


def test_sd15_adapter_with_an_sdxl_clip(comfy_sd15, api):
    api["clip"] = SDXL_CLIP
    set_input(api, "LLMDiffTextEncode", clip=["clip", 0])  # the adapter stays tiny-qwen2-sd15
    assert_node_error(comfy_sd15, api, "LLMDiffTextEncode", "the CLIP connected", "gives 2048", "768-wide",
                      "use an adapter trained for")


def test_half_copied_llm_folder(comfy_sd15, api):
    set_input(api, "LLMDiffLoadLLM", llm_name="broken-half-copied")
    assert_node_error(comfy_sd15, api, "LLMDiffLoadLLM", "broken-half-copied", "no weights", "copy the model's weight files")


@pytest.mark.parametrize("name, problem, fix", [
    ("broken-truncated.safetensors", "is truncated", "re-download or re-export it"),
    ("broken-pickle.safetensors", "is a pickle/PyTorch file", "adapters must be .safetensors"),
])
def test_broken_adapter_file(comfy_sd15, api, name, problem, fix):
    set_input(api, "LLMDiffLoadAdapter", adapter_name=name)
    assert_node_error(comfy_sd15, api, "LLMDiffLoadAdapter", name, problem, fix)


@pytest.mark.parametrize("node_type, field, name", [
    ("LLMDiffLoadLLM", "llm_name", "../LLM/tiny-qwen2"),
    ("LLMDiffLoadAdapter", "adapter_name", "/etc/passwd"),
])
def test_path_outside_the_model_folder_is_refused(comfy_sd15, api, node_type, field, name):
    """ComfyUI 0.3.75 checks a V3 combo's value against its list only for old-style (list) combos, so
    a name posted through the API reaches our resolver: it must refuse to leave the model folder."""
    set_input(api, node_type, **{field: name})
    assert_node_error(comfy_sd15, api, node_type, repr(name), "points outside models/", "as listed in the node's dropdown")


def test_a_shared_workflow_naming_a_model_this_machine_lacks(comfy_sd15, api):
    """What someone gets from a workflow made elsewhere: the name passes validation (see above) and
    the loader says which name it looked for, where, and what to do."""
    set_input(api, "LLMDiffLoadLLM", llm_name="Qwen2.5-1.5B-Instruct")
    assert_node_error(comfy_sd15, api, "LLMDiffLoadLLM", "'Qwen2.5-1.5B-Instruct' was not found", "models/LLM", "Copy it there")
