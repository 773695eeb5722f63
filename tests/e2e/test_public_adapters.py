"""The published adapters' shapes through the real ComfyUI server (docs/public_adapters.md).

Random files in the published layouts and shapes, built by the e2e fixture (conftest.py):
- ELLA-SD1.5-TSC's shape with the tiny T5 encoder, through Apply LLM Diff Adapter on SD1.5 with two
  schedulers, a batch of 2 and a ControlNet: the LLMDiffProbe trace records the context of every UNet
  and ControlNet call, and each must be ELLA at that call's timestep, computed here with the adapter
  library alone from the server's own files;
- the full-size RouWei-Gemma v0.1 shape on the random SDXL UNet: the loader recognises the preset, the
  encode node makes 308 x 2048 + pooled 1280 with SDXL's size fields, an image comes out. Its LLM has
  Gemma-3-1B's widths but 2 blocks and a 1000-piece vocabulary: the 1B model (262k vocabulary, 26 blocks,
  4 GB in fp32) beside the SDXL server's 16 GB peak would not fit this machine, and the adapter reads only
  the LLM's last state, so its width is what the test needs;
- bad pairings fail naming both sides.
"""
from __future__ import annotations

import functools

import pytest
import torch

from support.probes import read_trace, with_probe
from support.workflows import load_api, nodes_of, pixels, set_prompt, with_controlnet

ATOL = 1e-4  # the server and this process run the same fp32 CPU code, batched differently


@functools.lru_cache(maxsize=1)
def _ella(models_dir: str):
    from adapter import load_llm
    from adapter.foreign import load_foreign_adapter

    return load_llm(f"{models_dir}/LLM/tiny-t5"), load_foreign_adapter(f"{models_dir}/llm_adapters/ella-random.safetensors")


def ella_reference(server, prompt: str, t: float) -> torch.Tensor:
    from adapter.foreign.text import ELLA_TEXT, encode_text

    t5, ella = _ella(str(server.models_dir))
    with torch.no_grad():
        states = encode_text(t5, ELLA_TEXT, [prompt])
        return ella(states.states, None, t).context[0]


@pytest.mark.parametrize("sampler_name, scheduler", [("euler", "normal"), ("dpmpp_2m", "karras")])
def test_ella_is_exact_at_every_call_with_controlnet_and_batch_2(comfy_sd15, sampler_name, scheduler):
    prompt = f"a red bicycle against a blue door, a black cat in its basket, {sampler_name}"  # no A1111 weights
    api = with_controlnet(set_prompt(load_api(comfy_sd15, "sd15_ella"), prompt))
    api[nodes_of(api, "KSampler")[0]]["inputs"].update(steps=3, sampler_name=sampler_name, scheduler=scheduler)
    for latent in nodes_of(api, "EmptyLatentImage"):
        api[latent]["inputs"]["batch_size"] = 2
    result = comfy_sd15.run(with_probe(api), timeout=600)
    assert len(pixels(result)) == 2

    unet, control = read_trace(comfy_sd15)
    assert len(unet) >= 3 and len(control) == len(unet), (len(unet), len(control))
    timesteps = [float(call["timestep"][0]) for call in unet]
    assert len(set(timesteps)) >= 3, timesteps
    for call, cn in zip(unet, control):
        assert torch.equal(cn["context"], call["context"]), "ControlNet was given another context than the UNet"
        assert call["llmdiff_step"]["recomputed"] == 2
        t = float(call["timestep"][0])
        assert call["timestep"].tolist() == [t] * len(call["timestep"])
        for chunk, which in enumerate(call["chunks"]):  # positive and negative batched, 2 latents each
            expected = ella_reference(comfy_sd15, prompt if which == 0 else "", t)
            for row in call["context"][2 * chunk : 2 * chunk + 2]:
                torch.testing.assert_close(row, expected, atol=ATOL, rtol=1e-4)
    assert (unet[0]["context"] - unet[-1]["context"]).abs().max() > 1e-3, "the context did not change with the timestep"


def test_ella_loader_and_encode_info(comfy_sd15):
    api = set_prompt(load_api(comfy_sd15, "sd15_ella"), "a small green boat on a calm lake")
    result = comfy_sd15.run(api, timeout=600)
    pixels(result)
    texts = {api[api[p]["inputs"]["source"][0]]["class_type"]: "\n".join(result.outputs[p]["text"]) for p in nodes_of(api, "PreviewAny")}
    assert "ella-tsc" in texts["LLMDiffLoadAdapter"] and "sd15 context 64 x 768" in texts["LLMDiffLoadAdapter"]
    assert "fixed timestep 500" in texts["LLMDiffLoadAdapter"]
    assert "T5 encoder last_hidden_state, padded to 128 tokens" in texts["LLMDiffTextEncode"]


def test_bad_pairings_fail_naming_both_sides(comfy_sd15):
    api = set_prompt(load_api(comfy_sd15, "sd15_ella"), "a cat")
    for node in nodes_of(api, "LLMDiffLoadLLM"):
        api[node]["inputs"]["llm_name"] = "tiny-qwen2"
    result = comfy_sd15.run(api, timeout=600)
    assert not result.ok
    assert "'ella-random.safetensors' needs a T5 encoder folder" in result.error_text and "'tiny-qwen2'" in result.error_text

    api = set_prompt(load_api(comfy_sd15, "sd15_adapter"), "a cat")  # our Qwen adapter with a T5 encoder
    for node in nodes_of(api, "LLMDiffLoadLLM"):
        api[node]["inputs"]["llm_name"] = "tiny-t5"
    result = comfy_sd15.run(api, timeout=600)
    assert not result.ok
    assert "tiny-qwen2-sd15.safetensors" in result.error_text and "'tiny-t5' is a t5 text encoder" in result.error_text
    pixels(comfy_sd15.run(set_prompt(load_api(comfy_sd15, "sd15_ella"), "a cat"), timeout=600))  # the server still works


def test_rouwei_gemma_on_sdxl(comfy_sdxl):
    api = set_prompt(load_api(comfy_sdxl, "sdxl_rouwei_gemma"), "1girl, silver hair, reading a book")
    result = comfy_sdxl.run(api, timeout=900)
    pixels(result)
    texts = {api[api[p]["inputs"]["source"][0]]["class_type"]: "\n".join(result.outputs[p]["text"]) for p in nodes_of(api, "PreviewAny")}
    loader, encode = texts["LLMDiffLoadAdapter"], texts["LLMDiffTextEncode"]
    assert "RouWei-Gemma (gemma-3-1b)" in loader and "layout rouwei-fused" in loader and "sdxl context 308 x 2048 + pooled 1280" in loader
    assert "308 tokens x 2048, pooled 1280" in encode and "Gemma chat template" in encode and "skip_first 27" in encode


def test_sd15_adapter_on_sdxl_is_refused(comfy_sdxl):
    api = set_prompt(load_api(comfy_sdxl, "sdxl_rouwei_gemma"), "a cat")
    sampler = nodes_of(api, "KSampler")[0]
    api["ella"] = {"class_type": "LLMDiffLoadAdapter", "inputs": {"adapter_name": "ella-random.safetensors"}}
    api["apply"] = {"class_type": "LLMDiffApplyAdapter", "inputs": {"model": api[sampler]["inputs"]["model"], "adapter": ["ella", 0]}}
    api[sampler]["inputs"]["model"] = ["apply", 0]
    result = comfy_sdxl.run(api, timeout=900)
    assert not result.ok
    assert "768-wide SD1.5 context" in result.error_text and "gives 2048 (SDXL)" in result.error_text
