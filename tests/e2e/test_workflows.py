"""Every shipped workflow, converted from the UI format the frontend saves, queued through a real ComfyUI.

The shipped file is what is tested: each JSON in workflows/ is converted with ui_to_api against the
server's /object_info; the test only swaps in the fixture's model names and shrinks the run
(64x64, or 128x64 where an area condition needs room; 2 steps) by editing the API graph. The Load Checkpoint
workflows get a single-file SD1.5 checkpoint that ComfyUI's CheckpointSave writes from the random weights
(once per machine); there is no SDXL one (see checkpoint_name). Checks that
can fail for the right reason:
- an image comes out of every workflow, and it is not flat (NaN conditioning decodes to one colour);
- with the same seed, a different prompt gives a different image (the conditioning reaches the UNet),
  and the first prompt run again, recomputed rather than served from ComfyUI's cache, gives the
  identical image (the path is deterministic), without reloading the LLM and with prompt A's encoding
  served by our encode cache (the info output says so);
- an instrumented run records the context the UNet's cross-attention receives and finds our
  conditioning in it, value for value, batched with the negative in one UNet call
  (test_unet_cross_attention_receives_our_context).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from support.workflows import PROMPT_A, WORKFLOW_DIR, family_of, load_api, nodes_of, pixels, set_prompt

WORKFLOWS = sorted(p.stem for p in WORKFLOW_DIR.glob("*.json"))
SERVER_OF = {"sd15": "comfy_sd15", "sd2": "comfy_sd2", "sdxl": "comfy_sdxl"}
PROMPT_B = "a blue sphere floating above the sea"


@pytest.fixture
def server(request):
    workflow = request.getfixturevalue("workflow")
    return request.getfixturevalue(SERVER_OF[family_of(workflow)])


def test_all_workflows_are_shipped():
    assert set(WORKFLOWS) >= {"sd15_adapter", "sd15_adapter_clip_concat", "sdxl_adapter", "sd2_adapter", "sd15_adapter_controlnet_area",
                             "sd15_adapter_timestep_aware", "sd15_adapter_checkpoint", "sdxl_adapter_checkpoint", "sd15_ella",
                             "sdxl_rouwei_gemma"}


@pytest.mark.parametrize("workflow", WORKFLOWS)
def test_workflow_runs_and_the_prompt_steers_the_image(server, workflow):
    api = load_api(server, workflow)
    assert nodes_of(api, "LLMDiffTextEncode") and nodes_of(api, "LLMDiffLoadLLM")
    first = server.run(set_prompt(api, PROMPT_A), timeout=600)
    image_a = pixels(first)
    image_b = pixels(server.run(set_prompt(api, PROMPT_B), timeout=600))
    again = server.run(set_prompt(api, PROMPT_A), timeout=600)
    image_a2 = pixels(again)
    sampler = nodes_of(api, "KSampler")[0]
    assert sampler not in again.cached_nodes, "the repeat was served from ComfyUI's cache, so it proves nothing"
    # Only the prompt changed: the LLM is not loaded again (unless the server runs with ComfyUI's node
    # cache off, --cache-none, as the SDXL one does to fit in memory), and prompt A's encoding comes
    # from our own encode cache, which --cache-none does not touch.
    if not server.cache_none:
        assert set(nodes_of(api, "LLMDiffLoadLLM")) <= set(again.cached_nodes), again.cached_nodes
    for preview in nodes_of(api, "PreviewAny"):  # those showing an encode node's info (not a loader's)
        if api[api[preview]["inputs"]["source"][0]]["class_type"] == "LLMDiffTextEncode":
            assert "reused the cached encoding" in "\n".join(again.outputs[preview]["text"])
    assert np.abs(image_a - image_b).max() > 0, "two different prompts gave the same image with the same seed"
    assert np.array_equal(image_a, image_a2), "the same prompt and seed gave a different image"


# --- instrumented run ----------------------------------------------------------------------------
# The SD1.5 server carries a test-only node, LLMDiffProbe (tests/e2e/probe_node.py, see conftest.py):
# it patches the UNet's cross-attention (attn2) to save the first context it receives, and saves the
# CONDITIONING our node produced, so the test can compare them tensor for tensor.

def test_unet_cross_attention_receives_our_context(comfy_sd15):
    from safetensors.torch import load_file

    api = set_prompt(load_api(comfy_sd15, "sd15_adapter"), "a probe of the cross-attention")
    sampler = nodes_of(api, "KSampler")[0]
    inputs = api[sampler]["inputs"]
    api["probe"] = {"class_type": "LLMDiffProbe", "inputs": {"model": inputs["model"], "positive": inputs["positive"], "negative": inputs["negative"]}}
    inputs["model"] = ["probe", 0]
    probe_dir = comfy_sd15.output_dir / "probe"
    for stale in probe_dir.glob("*.safetensors"):
        stale.unlink()

    result = comfy_sd15.run(api, timeout=600)
    assert result.ok, result.error_text
    assert "probe" not in result.cached_nodes
    saved = load_file(probe_dir / "conditioning.safetensors")
    context = load_file(probe_dir / "attn2_context.safetensors")["context"]

    ours, negative = saved["positive"][0], saved["negative"][0]
    assert saved["positive"].shape == (1, 77, 768)
    # 77 tokens like CLIP's: ComfyUI batches positive and negative into ONE UNet call (CFG), so the
    # context has both as rows. An adapter ComfyUI could not batch would show up here as batch 1.
    assert context.shape == (2, 77, 768), context.shape
    # Tolerance covers the UNet's compute dtype (fp16 weights are upcast on a CPU, but not everywhere).
    close = lambda a, b: np.allclose(a.numpy(), b.numpy(), atol=1e-2, rtol=1e-2)  # noqa: E731
    assert any(close(row, ours) for row in context), "our positive context is not what the UNet attended to"
    assert any(close(row, negative) for row in context), "our negative context is not what the UNet attended to"
    assert not np.allclose(ours.numpy(), negative.numpy())


def test_workflows_are_listed_as_templates(comfy_sd15_core):
    templates = comfy_sd15_core.get_json("/workflow_templates")
    listed = next((names for pack, names in templates.items() if pack.lower().startswith("comfyui-llm-diff")), None)
    assert listed is not None, f"the pack is missing from /workflow_templates: {sorted(templates)}"
    assert set(WORKFLOWS) <= {Path(name).stem for name in listed}
