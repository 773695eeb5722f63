"""Shipped workflows as API prompts for the end-to-end tests: converted from the UI format, with the e2e
fixtures' model names and a small, fast run (tests/e2e/conftest.py names the models)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from devkit.comfyui import ComfyServer, repo_root

WORKFLOW_DIR = repo_root() / "workflows"
PROMPT_A = "a red cube on a wooden table"


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

    from devkit.cache import cache_dir

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


def with_controlnet(api: dict) -> dict:
    """A ControlNet (the fixture's random SD1.5 one, a grey hint) applied to the sampler's positive and negative."""
    sampler = nodes_of(api, "KSampler")[0]
    inputs = api[sampler]["inputs"]
    api["cn_loader"] = {"class_type": "ControlNetLoader", "inputs": {"control_net_name": "sd15_controlnet_random.safetensors"}}
    api["cn_hint"] = {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0x808080}}
    api["cn_apply"] = {"class_type": "ControlNetApplyAdvanced", "inputs": {
        "positive": inputs["positive"], "negative": inputs["negative"], "control_net": ["cn_loader", 0], "image": ["cn_hint", 0],
        "strength": 1.0, "start_percent": 0.0, "end_percent": 1.0}}
    inputs.update(positive=["cn_apply", 0], negative=["cn_apply", 1])
    return api
