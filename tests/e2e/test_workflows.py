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

import json
from pathlib import Path

import numpy as np
import pytest

from support.comfyui import ComfyServer, repo_root

WORKFLOW_DIR = repo_root() / "workflows"
WORKFLOWS = sorted(p.stem for p in WORKFLOW_DIR.glob("*.json"))
SERVER_OF = {"sd15": "comfy_sd15", "sd2": "comfy_sd2", "sdxl": "comfy_sdxl"}
PROMPT_A = "a red cube on a wooden table"
PROMPT_B = "a blue sphere floating above the sea"


def family_of(workflow: str) -> str:
    return workflow.split("_", 1)[0]


def fixture_names(family: str, timestep_aware: bool = False) -> dict[str, dict[str, str]]:
    """class_type -> {input: the e2e fixture's model name} (see tests/e2e/conftest.py). A workflow with
    Apply LLM Diff Adapter gets the timestep-aware adapter."""
    return {
        "UNETLoader": {"unet_name": f"{family}_unet_random.safetensors"},
        "VAELoader": {"vae_name": "sdxl_vae_random.safetensors" if family == "sdxl" else "sd_vae_random.safetensors"},
        "CLIPLoader": {"clip_name": "clip_l_random.safetensors"},
        "ControlNetLoader": {"control_net_name": "sd15_controlnet_random.safetensors"},
        "LLMDiffLoadLLM": {"llm_name": "tiny-qwen2"},
        "LLMDiffLoadAdapter": {"adapter_name": f"tiny-qwen2-{family}{'-timestep' if timestep_aware else ''}.safetensors"},
    }


# Workflows for the published adapters (docs/public_adapters.md): their text model and adapter in the
# fixture's shapes (tests/e2e/conftest.py).
PUBLIC_ADAPTER_NAMES = {
    "sd15_ella": {"LLMDiffLoadLLM": {"llm_name": "tiny-t5"}, "LLMDiffLoadAdapter": {"adapter_name": "ella-random.safetensors"}},
    "sdxl_rouwei_gemma": {"LLMDiffLoadLLM": {"llm_name": "gemma3-1b-width"},
                          "LLMDiffLoadAdapter": {"adapter_name": "rouwei-gemma-random.safetensors"}},
}


def load_api(server: ComfyServer, workflow: str) -> dict:
    """The shipped UI workflow as an API prompt, with fixture models and a small, fast run."""
    from support.workflow_convert import ui_to_api

    ui = json.loads((WORKFLOW_DIR / f"{workflow}.json").read_text(encoding="utf-8"))
    api = ui_to_api(ui, server.object_info())
    family = family_of(workflow)
    has_area = bool(nodes_of(api, "ConditioningSetArea"))
    names = fixture_names(family, timestep_aware=bool(nodes_of(api, "LLMDiffApplyAdapter")))
    names.update(PUBLIC_ADAPTER_NAMES.get(workflow, {}))
    if nodes_of(api, "CheckpointLoaderSimple"):
        names["CheckpointLoaderSimple"] = {"ckpt_name": checkpoint_name(server, family)}
    for node in api.values():
        inputs = node["inputs"]
        inputs.update(names.get(node["class_type"], {}))
        if node["class_type"] in ("EmptyLatentImage", "EmptyImage"):
            # 128 wide where an area condition needs room for its minimum size (64) to be half the image.
            inputs.update(width=128 if has_area else 64, height=64)
        elif node["class_type"] == "ConditioningSetArea":
            inputs.update(width=64, height=64, x=0, y=0)  # 64 is the node's minimum: the left half of 128x64
        elif node["class_type"] in ("KSampler", "KSamplerAdvanced"):
            inputs.update(steps=2)
    return api


def checkpoint_name(server: ComfyServer, family: str) -> str:
    """A single-file checkpoint of the fixture's random SD1.5 UNet, CLIP-L and VAE, written by ComfyUI's own
    CheckpointSave once per machine (cached) and linked into the server's models/checkpoints."""
    import os
    import shutil

    from support.cache import cache_dir

    name = f"{family}_checkpoint_random.safetensors"
    if family != "sd15":
        pytest.skip(f"no {family} single-file checkpoint fixture: the e2e {family} server has no CLIP to save beside "
                    "its UNet (the graph is the UNet workflow with Load Checkpoint in place of two loaders)")
    cached = cache_dir() / "checkpoints" / name
    if not cached.is_file():
        prefix = f"checkpoints/llmdiff_fixture_{os.getpid()}"
        result = server.run({
            "1": {"class_type": "UNETLoader", "inputs": {"unet_name": "sd15_unet_random.safetensors", "weight_dtype": "default"}},
            "2": {"class_type": "CLIPLoader", "inputs": {"clip_name": "clip_l_random.safetensors", "type": "stable_diffusion"}},
            "3": {"class_type": "VAELoader", "inputs": {"vae_name": "sd_vae_random.safetensors"}},
            "4": {"class_type": "CheckpointSave", "inputs": {"model": ["1", 0], "clip": ["2", 0], "vae": ["3", 0], "filename_prefix": prefix}},
        }, timeout=900)
        assert result.ok, result.error_text
        [written] = server.output_dir.glob(f"{prefix}_*.safetensors")
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(f".tmp-{os.getpid()}")
        shutil.move(written, tmp)
        os.replace(tmp, cached)
    if name not in server.models("checkpoints"):
        server.link_model("checkpoints", cached, name)
    return name


def nodes_of(api: dict, class_type: str) -> list[str]:
    return [node_id for node_id, node in api.items() if node["class_type"] == class_type]


def set_prompt(api: dict, text: str) -> dict:
    """Every non-empty LLM Diff Text Encode prompt becomes `text` (the empty negatives stay empty)."""
    for node_id in nodes_of(api, "LLMDiffTextEncode"):
        if api[node_id]["inputs"]["text"]:
            api[node_id]["inputs"]["text"] = text
    return api


def pixels(result) -> np.ndarray:
    assert result.ok, result.error_text
    assert result.images, "the workflow produced no image"
    images = np.stack([np.asarray(img, dtype=np.int16) for img in result.images])
    # Random weights give noise-like images; NaN conditioning decodes to one flat colour.
    assert all(img.std() > 1.0 for img in images), "an image is flat: the conditioning is NaN or did not reach the UNet"
    return images


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
