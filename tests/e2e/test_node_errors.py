"""Edge cases that must work and errors that must fail clearly, through a real ComfyUI's HTTP API.

Each failure must be a node error naming the problem and the fix, the server must keep running,
and the next, valid prompt must succeed. Graphs start from the shipped sd15_adapter workflow.
"""
from __future__ import annotations

import os
import re

import numpy as np
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


def tokens_used(info: str) -> tuple[int, int]:
    """(prompt tokens used, budget) from the info item "- prompt: N of B tokens used (...)" (a Markdown list)."""
    match = re.search(r"^- prompt: (\d+) of (\d+) tokens used", info, re.MULTILINE)
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


def validation_errors(result, node_type: str) -> str:
    """The details of every validation error ComfyUI reported for nodes of `node_type`, one per line."""
    nodes = result.error.get("node_errors") or {}
    return "\n".join(e.get("details", "") for n in nodes.values() if n.get("class_type") == node_type for e in n["errors"])


def assert_node_error(server, api, node_type: str, *phrases: str, stage: str = "execution") -> None:
    """The prompt fails in `node_type` at `stage` ("execution", or "validation": refused before anything
    ran) with a message holding every phrase; then a valid prompt still runs."""
    result = server.run(api, timeout=600)
    assert not result.ok
    assert result.error["kind"] == stage, result.error_text
    if stage == "validation":
        message = validation_errors(result, node_type)
    else:
        assert result.error["node_type"] == node_type, result.error_text
        message = result.error["exception_message"]
    for phrase in phrases:
        assert phrase in message, result.error_text
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
    assert_node_error(comfy_sd15, api, node_type, repr(name), "points outside models/", "as listed in the node's dropdown",
                      stage="validation")


def test_a_shared_workflow_naming_a_model_this_machine_lacks(comfy_sd15, api):
    """What someone gets from a workflow made elsewhere: the name passes validation (see above) and
    the loader says which name it looked for, where, and what to do."""
    set_input(api, "LLMDiffLoadLLM", llm_name="Qwen2.5-1.5B-Instruct")
    assert_node_error(comfy_sd15, api, "LLMDiffLoadLLM", "'Qwen2.5-1.5B-Instruct' was not found", "models/LLM", "Copy it there",
                      stage="validation")


@pytest.mark.parametrize("field", ["llm_strength", "clip_strength"])
def test_nan_strength_through_the_api_is_refused(comfy_sd15, api, field):
    """A NaN passes ComfyUI's min/max check (the JSON body says NaN); it used to give a black image reported as success."""
    api[positive_encode(api)]["inputs"][field] = float("nan")
    assert_node_error(comfy_sd15, api, "LLMDiffTextEncode", f"{field} is nan", "not a finite number")


def test_lone_surrogate_through_the_api_is_replaced_and_reported(comfy_sd15, api):
    """What a browser's JSON.stringify sends for half an emoji: the tokenizer cannot encode it."""
    api[positive_encode(api)]["inputs"]["text"] = "a red cube \ud83d on a table"
    result = comfy_sd15.run(api, timeout=600)
    pixels(result)
    assert "replaced with U+FFFD" in info_text(result, api)


def test_a_replaced_adapter_file_is_picked_up_without_a_restart(comfy_sd15, api, tmp_path):
    """Overwrite models/llm_adapters/<name> with a newly trained file: the next prompt must use the new weights."""
    import torch

    from adapter import load_adapter, save_adapter

    source = (comfy_sd15.models_dir / "llm_adapters" / "tiny-qwen2-sd15.safetensors").resolve()
    replaceable = tmp_path / "replaceable.safetensors"
    replaceable.write_bytes(source.read_bytes())
    comfy_sd15.link_model("llm_adapters", replaceable, "replaceable.safetensors")
    set_input(api, "LLMDiffLoadAdapter", adapter_name="replaceable.safetensors")
    first = pixels(comfy_sd15.run(api, timeout=600))

    retrained = load_adapter(replaceable)
    with torch.no_grad():
        for p in retrained.context_head.parameters():
            p.mul_(-3.0)
    save_adapter(tmp_path / "export.safetensors", retrained)
    os.replace(tmp_path / "export.safetensors", replaceable)  # as the trainer's export lands: a new file, same name
    result = comfy_sd15.run(api, timeout=600)
    second = pixels(result)
    assert [n for n in nodes_of(api, "LLMDiffLoadAdapter") if n in result.cached_nodes] == []
    assert not np.array_equal(first, second), "the image did not change: the old adapter weights were used"


def test_every_missing_model_file_is_reported_before_anything_runs(comfy_sd15, api):
    """A template run as shipped names files this machine lacks: ComfyUI's input validation (our loaders'
    validate_inputs) refuses the prompt with all of them at once, each with the folder it belongs in."""
    set_input(api, "LLMDiffLoadLLM", llm_name="Qwen2.5-1.5B-Instruct")
    set_input(api, "LLMDiffLoadAdapter", adapter_name="qwen2.5-1.5b-sd15.safetensors")
    result = comfy_sd15.run(api, timeout=600)
    assert not result.ok and result.error["kind"] == "validation", result.error_text
    llm, adapter = validation_errors(result, "LLMDiffLoadLLM"), validation_errors(result, "LLMDiffLoadAdapter")
    assert "'Qwen2.5-1.5B-Instruct' was not found" in llm and "models/LLM" in llm, result.error_text
    assert "'qwen2.5-1.5b-sd15.safetensors' was not found" in adapter and "models/llm_adapters" in adapter, result.error_text
    assert not result.history, "the prompt ran although its model files are missing"
