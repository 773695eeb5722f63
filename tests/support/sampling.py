"""ComfyUI's real sampling code on a tiny random UNet of the SD1.5 layout, for in-process node tests.

Fixtures (`one_thread`, `comfy`, `unet`) and helpers that drive ComfyUI's convert_cond / process_conds /
calc_cond_batch and its KSampler nodes, with a test-only APPLY_MODEL wrapper that records every UNet call.
A test module imports the fixtures it uses (and `node_models` from support.node_models, which `comfy` needs).
"""
from __future__ import annotations

import types

import pytest
import torch

from devkit.comfy_pack import _torchvision_stub_if_missing, pack_module

ATOL = 1e-5
TINY_SD15_UNET = {  # comfy.model_detection's SD15 config, shrunk: 2 levels of 32/64 channels
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
    "adm_in_channels": None, "dtype": torch.float32, "in_channels": 4, "model_channels": 32, "num_res_blocks": [1, 1],
    "transformer_depth": [1, 1], "channel_mult": [1, 2], "transformer_depth_middle": 1, "use_linear_in_transformer": False,
    "context_dim": 768, "transformer_depth_output": [1, 1, 1, 1], "use_temporal_attention": False, "use_temporal_resblock": False,
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: each op is microseconds, and two threads fighting over a shared 2-core machine made
    these tests 30x slower than one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def comfy(env):
    """ComfyUI's modules the tests drive (its nodes.py imports torchvision only for models we do not use)."""
    with _torchvision_stub_if_missing():
        import nodes
    import comfy.model_patcher
    import comfy.patcher_extension
    import comfy.sampler_helpers
    import comfy.samplers

    return types.SimpleNamespace(nodes=nodes, samplers=comfy.samplers, helpers=comfy.sampler_helpers,
                                 patcher=comfy.model_patcher, ext=comfy.patcher_extension)


@pytest.fixture(scope="module")
def unet(comfy):
    from comfy.supported_models import SD15

    model = SD15(dict(TINY_SD15_UNET)).get_model({}, device="cpu")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # ComfyUI's layers skip weight init (weights come from a file); draw them
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    cpu = torch.device("cpu")
    return comfy.patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


def recording(comfy, model):
    """A clone of `model` whose every UNet call is recorded (context, timesteps, our wrapper's record, kwargs)."""
    record_key = pack_module("nodes.timestep_aware.wrapper").RECORD_KEY
    calls = []

    def record(executor, x, t, c_concat, c_crossattn, control, transformer_options, **kwargs):
        calls.append(dict(timesteps=executor.class_obj.model_sampling.timestep(t).tolist(), context=c_crossattn.clone(),
                          chunks=list(transformer_options["cond_or_uncond"]), record=transformer_options.get(record_key),
                          kwargs=set(kwargs)))
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)

    clone = model.clone()
    clone.add_wrapper_with_key(comfy.ext.WrappersMP.APPLY_MODEL, "test_recorder", record)
    return clone, calls


def calc_cond_batch(comfy, model, positive, negative, sigmas):
    """One sampler step's model evaluation, prepared the way ComfyUI's CFGGuider prepares it."""
    x = torch.randn(len(sigmas), 4, 8, 8, generator=torch.Generator().manual_seed(1))
    conds = {"positive": comfy.helpers.convert_cond(positive), "negative": comfy.helpers.convert_cond(negative)}
    conds = comfy.samplers.process_conds(model.model, x, conds, "cpu")
    model_options = comfy.patcher.create_model_options_clone(model.model_options)
    comfy.helpers.prepare_model_patcher(model, conds, model_options)
    model.pre_run()
    sigma = torch.tensor(sigmas, dtype=torch.float32)
    return comfy.samplers.calc_cond_batch(model.model, [conds["positive"], conds["negative"]], x, sigma, model_options)


def apply(nodes, unet, adapter):
    return nodes["LLMDiffApplyAdapter"].execute(unet, adapter).args[0]


def sigma_of(unet, t: float) -> float:
    return float(unet.model.model_sampling.sigma(torch.tensor(t)))


def ksample(comfy, model, positive, negative, sampler="euler", scheduler="normal", denoise=1.0, advanced=None, steps=4):
    latent = {"samples": torch.zeros(2, 4, 8, 8)}  # batch 2
    if advanced:
        return comfy.nodes.KSamplerAdvanced().sample(model, "enable", 7, steps, 5.0, sampler, scheduler, positive, negative, latent,
                                                     advanced[0], advanced[1], "disable")[0]["samples"]
    return comfy.nodes.KSampler().sample(model, 7, steps, 5.0, sampler, scheduler, positive, negative, latent, denoise=denoise)[0]["samples"]
