"""Apply LLM Diff Adapter (timestep-aware) in the real ComfyUI server, SD1.5.

Instrumented, not assumed: the test-only LLMDiffProbe node (probe_node.py, trace mode) records the context
of every UNet call and of every ControlNet call with their timesteps, and what our wrapper reported. The
expected contexts are computed here, in the test process, with the adapter library alone (the LLM and the
adapter files the server uses, one prompt at a time at the recorded timestep).
- the UNet's context changes from step to step and is, per step, exactly the adapter at that step's
  timestep; ControlNet receives the very same context in every call;
- one run per sampler family (euler; dpmpp_2m with karras; denoise 0.6) finishes with an image, the
  wrapper having recomputed both prompts at every UNet call;
- a static adapter through the node gives a bit-identical image to the plain path, and the trace shows
  the wrapper ran at every call.
"""
from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from support.probes import read_trace, with_probe
from support.workflows import load_api, nodes_of, pixels, set_prompt, with_controlnet

WORKFLOW = "sd15_adapter_timestep_aware"
ADAPTER = "tiny-qwen2-sd15-timestep.safetensors"
ATOL = 1e-4  # the server and this process run the same fp32 CPU code, batched differently


@functools.lru_cache(maxsize=1)
def _models(llm_dir: str, adapter_file: str):
    from adapter import load_adapter, load_llm

    return load_llm(llm_dir), load_adapter(adapter_file).eval()


@pytest.fixture
def reference(comfy_sd15):
    """prompt, t -> the adapter's context for this one prompt at timestep t, from the server's own files."""
    from adapter import encode_prompts

    models = comfy_sd15.models_dir
    llm, adapter = _models(str(models / "LLM" / "tiny-qwen2"), str(models / "llm_adapters" / ADAPTER))

    def context(prompt: str, t: float) -> torch.Tensor:
        with torch.no_grad():
            enc = encode_prompts(llm, adapter.config.template, [prompt])
            return adapter(enc.hidden_states.float(), enc.attention_mask, t).context[0]

    return context


def test_the_context_follows_the_timestep_and_controlnet_sees_the_same(comfy_sd15, reference):
    prompt = "a red cube on a wooden table, seen by a ControlNet"
    api = set_prompt(load_api(comfy_sd15, WORKFLOW), prompt)
    api[nodes_of(api, "KSampler")[0]]["inputs"].update(steps=3)
    api = with_controlnet(api)
    result = comfy_sd15.run(with_probe(api), timeout=600)
    pixels(result)

    unet, control = read_trace(comfy_sd15)
    assert len(unet) == 3 and len(control) == 3, (len(unet), len(control))
    timesteps = [float(call["timestep"][0]) for call in unet]
    assert timesteps == sorted(set(timesteps), reverse=True), timesteps  # three distinct, decreasing steps
    for call, cn in zip(unet, control):
        assert torch.equal(cn["timestep"], call["timestep"])
        assert torch.equal(cn["context"], call["context"]), "ControlNet was given another context than the UNet"
        assert call["llmdiff_step"]["recomputed"] == 2
        t = float(call["timestep"][0])
        for chunk, which in enumerate(call["chunks"]):  # positive and negative batched in one call
            expected = reference(prompt if which == 0 else "", t)
            torch.testing.assert_close(call["context"][chunk], expected, atol=ATOL, rtol=0)
    first, last = unet[0]["context"], unet[-1]["context"]
    assert (first - last).abs().max() > 1e-3, "the context did not change with the timestep"


@pytest.mark.parametrize("run", [dict(sampler_name="euler", scheduler="normal"),
                                 dict(sampler_name="dpmpp_2m", scheduler="karras"),
                                 dict(sampler_name="euler", scheduler="normal", denoise=0.6)],
                         ids=["euler", "dpmpp_2m-karras", "denoise-0.6"])
def test_every_sampler_family_finishes_with_the_wrapper_at_every_call(comfy_sd15, run):
    label = "-".join(str(v) for v in run.values())
    api = set_prompt(load_api(comfy_sd15, WORKFLOW), f"a blue sphere floating above the sea ({label})")  # new prompt: the probe reruns
    api[nodes_of(api, "KSampler")[0]]["inputs"].update(run)
    pixels(comfy_sd15.run(with_probe(api), timeout=600))
    unet, _ = read_trace(comfy_sd15)
    assert len(unet) == 2 and all(call["llmdiff_step"]["recomputed"] == 2 for call in unet)
    first_t = float(unet[0]["timestep"][0])
    if run.get("denoise", 1.0) < 1:
        assert first_t < 0.8 * 999, first_t  # starts part-way down the schedule
    else:
        assert first_t > 990, first_t


def test_static_adapter_through_the_node_is_bit_identical(comfy_sd15):
    prompt = "a green pyramid in the desert"
    plain_api = with_probe(set_prompt(load_api(comfy_sd15, "sd15_adapter"), prompt))
    plain = comfy_sd15.run(plain_api, timeout=600)
    plain_image = pixels(plain)
    plain_trace, _ = read_trace(comfy_sd15)

    node_api = set_prompt(load_api(comfy_sd15, "sd15_adapter"), prompt)
    sampler = nodes_of(node_api, "KSampler")[0]
    adapter_loader = nodes_of(node_api, "LLMDiffLoadAdapter")[0]
    node_api["apply"] = {"class_type": "LLMDiffApplyAdapter",
                         "inputs": {"model": node_api[sampler]["inputs"]["model"], "adapter": [adapter_loader, 0]}}
    node_api[sampler]["inputs"]["model"] = ["apply", 0]
    through_node = comfy_sd15.run(with_probe(node_api), timeout=600)
    assert sampler not in through_node.cached_nodes
    node_trace, _ = read_trace(comfy_sd15)

    assert np.array_equal(pixels(through_node), plain_image), "the static adapter through the node changed the image"
    assert plain_trace and all(call["llmdiff_step"] is None for call in plain_trace)
    assert len(node_trace) == len(plain_trace)
    steps = [call["llmdiff_step"] for call in node_trace]  # the wrapper ran at every call, found both entries,
    assert all(s is not None and s["entries"] == 2 and s["recomputed"] == 0 for s in steps), steps  # changed none
