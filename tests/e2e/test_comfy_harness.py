"""Smoke tests of the end-to-end harness with ComfyUI core nodes only.

If these fail, the harness (provisioning, random weights, server, result parsing) is broken, not our
nodes: the node and workflow tests build on exactly these pieces.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from support.workflow_convert import ui_to_api

UNET = "sd15_unet_random.safetensors"


def sd15_graph(text: str, seed: int = 42, unet: str = UNET, prefix: str = "harness") -> dict:
    """txt2img with core nodes: UNet + VAE + CLIP-L loaded separately, 2 steps at 64x64."""
    return {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": unet, "weight_dtype": "default"}},
        "2": {"class_type": "VAELoader", "inputs": {"vae_name": "sd_vae_random.safetensors"}},
        "3": {"class_type": "CLIPLoader", "inputs": {"clip_name": "clip_l_random.safetensors", "type": "stable_diffusion"}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": text, "clip": ["3", 0]}},
        "5": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["3", 0]}},
        "6": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "7": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "positive": ["4", 0], "negative": ["5", 0], "latent_image": ["6", 0],
            "seed": seed, "steps": 2, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["7", 0], "vae": ["2", 0]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": prefix}},
    }


def pixels(result) -> np.ndarray:
    assert result.ok, result.error_text
    assert len(result.images) == 1
    return np.asarray(result.images[0].convert("RGB"), dtype=np.float32)


@pytest.fixture(scope="module")
def red_cube(_servers):
    """One run of the core graph, shared by the tests below (each run costs ~20 s on a busy CPU)."""
    return _servers.acquire("sd15").run(sd15_graph("a red cube on a table"))


def test_sd15_core_graph_gives_a_real_image(comfy_sd15_core, red_cube):
    server = comfy_sd15_core
    info = server.object_info()
    assert UNET in info["UNETLoader"]["input"]["required"]["unet_name"][0]
    assert "sd15_controlnet_random.safetensors" in server.models("controlnet")

    image = pixels(red_cube)

    assert image.shape == (64, 64, 3)
    # NaN conditioning (a CLIP file ComfyUI could not map) decodes to a flat black image.
    assert image.std() > 1.0, "the image is flat: the conditioning or the weights are broken"
    assert "clip missing" not in server.log_text(), "ComfyUI could not map the CLIP-L keys"


def test_prompt_changes_the_image_and_a_rerun_reproduces_it(comfy_sd15_core, red_cube):
    server = comfy_sd15_core
    other = server.run(sd15_graph("a blue sphere in the sky"))
    again = server.run(sd15_graph("a red cube on a table"))

    # The re-run must really sample again (ComfyUI would otherwise serve the cached result).
    assert "7" not in again.cached_nodes, again.cached_nodes
    assert np.abs(pixels(red_cube) - pixels(other)).max() > 0, "two prompts gave the same image"
    assert np.array_equal(pixels(red_cube), pixels(again)), "the same prompt and seed gave different images"


def test_converter_matches_comfyui_on_its_own_default_workflow(comfy_sd15_core):
    """ComfyUI's shipped default template, converted with the live /object_info, passes the server's
    validation everywhere except the checkpoint file we do not have."""
    spec = importlib.util.find_spec("comfyui_workflow_templates_media_other")
    ui = json.loads((Path(spec.origin).parent / "templates" / "default.json").read_text())

    api = ui_to_api(ui, comfy_sd15_core.object_info())

    assert {k: (v["class_type"], v["inputs"]) for k, v in api.items()} == {
        "4": ("CheckpointLoaderSimple", {"ckpt_name": "v1-5-pruned-emaonly-fp16.safetensors"}),
        "3": ("KSampler", {"seed": 685468484323813, "steps": 20, "cfg": 8, "sampler_name": "euler", "scheduler": "normal",
                           "denoise": 1, "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0]}),
        "8": ("VAEDecode", {"samples": ["3", 0], "vae": ["4", 2]}),
        "9": ("SaveImage", {"filename_prefix": "SD1.5", "images": ["8", 0]}),
        "7": ("CLIPTextEncode", {"text": "text, watermark", "clip": ["4", 1]}),
        "5": ("EmptyLatentImage", {"width": 512, "height": 512, "batch_size": 1}),
        "6": ("CLIPTextEncode", {"text": "beautiful scenery nature glass bottle landscape, purple galaxy bottle,", "clip": ["4", 1]}),
    }
    rejected = comfy_sd15_core.run(api)
    assert rejected.status == "rejected"
    assert set(rejected.error["node_errors"]) == {"4"}, rejected.error_text
    assert "v1-5-pruned-emaonly-fp16.safetensors" in rejected.error_text


def test_errors_come_back_and_the_server_keeps_running(comfy_sd15_core):
    server = comfy_sd15_core
    # Validation: a file that is not in the list never reaches execution.
    rejected = server.run(sd15_graph("x", unet="no_such_unet.safetensors"))
    assert rejected.status == "rejected"
    assert "no_such_unet.safetensors" in rejected.error_text
    assert rejected.error["node_errors"]["1"]["class_type"] == "UNETLoader"

    # Execution: a CLIP file offered as a UNet passes validation and fails inside UNETLoader.
    server.link_model("unet", server.models_dir / "clip" / "clip_l_random.safetensors", "not_a_unet.safetensors")
    failed = server.run(sd15_graph("x", unet="not_a_unet.safetensors"))
    assert failed.status == "error"
    assert failed.error["node_type"] == "UNETLoader" and failed.error["node_id"] == "1"
    assert "not_a_unet.safetensors" in failed.error_text

    assert server.run(sd15_graph("still alive")).ok


def _load_unet_only(unet: str) -> dict:
    """Loading a UNet with nothing else: PreviewAny is an output node, so ComfyUI executes the loader."""
    return {"1": {"class_type": "UNETLoader", "inputs": {"unet_name": unet, "weight_dtype": "default"}},
            "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 0]}}}


def test_sd2_unet_is_detected_as_v_prediction(comfy_sd2_core):
    """ComfyUI decides v-prediction for a bare SD2 UNet from one bias's spread; our 768-v weights pass it."""
    server = comfy_sd2_core
    assert "sd2_unet_random.safetensors" in server.models("diffusion_models")
    result = server.run(_load_unet_only("sd2_unet_random.safetensors"))
    assert result.ok, result.error_text
    assert "model_type V_PREDICTION" in server.log_text()


@pytest.mark.timeout(900)
def test_sdxl_unet_loads(comfy_sdxl_core):
    server = comfy_sdxl_core
    assert "sdxl_unet_random.safetensors" in server.models("diffusion_models")
    assert "sdxl_vae_random.safetensors" in server.models("vae")
    result = server.run(_load_unet_only("sdxl_unet_random.safetensors"), timeout=600)
    assert result.ok, result.error_text
    assert "model_type EPS" in server.log_text()
