"""Published adapters (ELLA, RouWei) through our nodes, in-process inside ComfyUI's real sampling code.

Random files in the published layouts (devkit/foreign_files.py), tiny random T5 / Gemma 3
text models with real tokenizers, and the tiny SD1.5-layout UNet of support.sampling. The
references are computed with the adapter library alone (text side + module), one prompt and one
timestep at a time, never through the nodes.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from devkit.foreign_files import write_random_ella, write_random_rouwei
from devkit.tiny_encoders import make_tiny_t5
from devkit.tiny_models import make_tiny_llm
from support.node_models import FakeClip, node_models, qwen  # noqa: F401  (fixtures; env = node_models)
from support.sampling import ATOL, apply, calc_cond_batch, comfy, ksample, one_thread, recording, sigma_of, unet  # noqa: F401
from devkit.comfy_pack import pack_module

# The random ELLA's context has values up to ~10; batching two timesteps in one call changes fp32
# rounding by up to ~3e-5 there, so comparisons across batchings allow 1e-4 absolute / 1e-4 relative.
BATCH_TOL = dict(atol=1e-4, rtol=1e-4)
SMALL_ROUWEI = dict(llm_dim=64, sdxl_seq_dim=64, sdxl_pooled_dim=32, max_input_len=48, target_seq_len=10,
                    n_wide_blocks=1, n_narrow_blocks=1, num_heads=4)


@pytest.fixture(scope="module")
def nodes(env):  # noqa: F811
    """The folders of test_nodes_encode plus a tiny T5 and Gemma 3 and random published-layout files."""
    import folder_paths

    lib = pack_module("adapter.foreign")
    llm_dir = Path(folder_paths.get_folder_paths("LLM")[0])
    adapter_dir = Path(folder_paths.get_folder_paths("llm_adapters")[0])
    for name, path in (("tiny-t5", make_tiny_t5()), ("tiny-gemma3", make_tiny_llm(family="gemma3"))):
        if not (llm_dir / name).exists():
            (llm_dir / name).symlink_to(path)
    # ELLA-shaped (768-wide SD1.5 context, 64 latents), reading the tiny T5's 64-wide states; 2 blocks.
    write_random_ella(adapter_dir / "ella-tiny.safetensors", lib.EllaConfig(input_dim=64, layers=2))
    write_random_rouwei(adapter_dir / "rouwei-tiny.safetensors", lib.RouWeiConfig(**SMALL_ROUWEI), fused=True)
    write_random_rouwei(adapter_dir / "rouwei-tiny-qkv.safetensors", lib.RouWeiConfig(**SMALL_ROUWEI), fused=False)
    return env[1]


def load(nodes, name):
    return nodes["LLMDiffLoadAdapter"].execute(name).args


@pytest.fixture(scope="module")
def t5(nodes):
    return nodes["LLMDiffLoadLLM"].execute("tiny-t5", "auto").args[0]


@pytest.fixture(scope="module")
def gemma(nodes):
    return nodes["LLMDiffLoadLLM"].execute("tiny-gemma3", "auto").args[0]


@pytest.fixture(scope="module")
def ella(nodes):
    return load(nodes, "ella-tiny.safetensors")[0]


def encode(nodes, llm, adapter, text, **kwargs):
    pack_module("nodes.encode").ENCODE_CACHE.clear()
    return nodes["LLMDiffTextEncode"].execute(llm, adapter, text, **kwargs).args


def ella_reference(t5, ella, text, t, strength=1.0, pad=True):
    from dataclasses import replace

    text_lib = pack_module("adapter.foreign.text")
    side = replace(text_lib.ELLA_TEXT, pad=pad)
    with torch.no_grad():
        states = text_lib.encode_text(t5.loaded, side, [text])
        return ella.module(states.states, None, t).context * strength


def test_loader_reports_what_it_found(nodes):
    _, info = load(nodes, "ella-tiny.safetensors")
    assert "layout ella-tsc" in info and "sd15 context 64 x 768" in info and "input_dim 64" in info
    assert "fixed timestep 500" in info and "Apply LLM Diff Adapter" in info
    for name, layout in (("rouwei-tiny.safetensors", "rouwei-fused"), ("rouwei-tiny-qkv.safetensors", "rouwei-separate-qkv")):
        _, info = load(nodes, name)
        assert f"layout {layout}" in info and "llm_dim 64" in info and "num_heads 4" in info
    _, info = load(nodes, "qwen-sd15.safetensors")
    assert info.startswith("LLM Diff Adapter [ours]")


def test_ella_text_encode_without_apply_uses_the_fixed_timestep(nodes, t5, ella):
    cond, info = encode(nodes, t5, ella, "a red cube on a table", llm_strength=0.8)
    expected = ella_reference(t5, ella, "a red cube on a table", 500.0, 0.8)
    assert cond[0][0].shape == (1, 64, 768)
    torch.testing.assert_close(cond[0][0], expected, atol=ATOL, rtol=0)
    assert "T5 encoder last_hidden_state, padded to 128" in info and "fixed timestep 500" in info
    flexible, info = encode(nodes, t5, ella, "a red cube on a table", t5_padding="flexible")
    torch.testing.assert_close(flexible[0][0], ella_reference(t5, ella, "a red cube on a table", 500.0, pad=False), atol=ATOL, rtol=0)


def test_ella_through_apply_is_exact_at_every_call_timestep(comfy, nodes, unet, t5, ella):  # noqa: F811
    positive = encode(nodes, t5, ella, "a red cube")[0]
    negative = encode(nodes, t5, ella, "")[0]
    sigmas = [sigma_of(unet, 800.0), sigma_of(unet, 150.0)]  # per-sample timesteps in one call
    patched, calls = recording(comfy, apply(nodes, unet, ella))
    calc_cond_batch(comfy, patched, positive, negative, sigmas)
    assert calls and calls[0]["record"]["recomputed"] == 2
    for call in calls:
        for chunk, which in enumerate(call["chunks"]):
            text = "a red cube" if which == 0 else ""
            rows = call["context"][2 * chunk : 2 * chunk + 2]
            expected = torch.cat([ella_reference(t5, ella, text, t) for t in call["timesteps"][2 * chunk : 2 * chunk + 2]])
            torch.testing.assert_close(rows, expected, **BATCH_TOL)
    assert (calls[0]["context"][0] - calls[0]["context"][1]).abs().max() > 1e-3  # two timesteps, two contexts


@pytest.mark.parametrize("sampler, scheduler", [("euler", "normal"), ("dpmpp_2m", "karras")])
def test_ella_sampling_runs_with_batch_2(comfy, nodes, unet, t5, ella, sampler, scheduler):  # noqa: F811
    positive, negative = encode(nodes, t5, ella, "a red cube")[0], encode(nodes, t5, ella, "")[0]
    patched, calls = recording(comfy, apply(nodes, unet, ella))
    samples = ksample(comfy, patched, positive, negative, sampler=sampler, scheduler=scheduler, steps=3)
    assert torch.isfinite(samples).all() and samples.shape[0] == 2
    steps = [c["timesteps"][0] for c in calls]
    assert len(set(steps)) == len(steps) >= 2
    for call in calls:
        t = call["timesteps"][0]
        chunk = call["chunks"].index(0)
        torch.testing.assert_close(call["context"][2 * chunk], ella_reference(t5, ella, "a red cube", t)[0], **BATCH_TOL)


def test_rouwei_text_encode_matches_the_library(nodes, gemma):
    text_lib = pack_module("adapter.foreign.text")
    for name in ("rouwei-tiny.safetensors", "rouwei-tiny-qkv.safetensors"):
        adapter = load(nodes, name)[0]
        cond, info = encode(nodes, gemma, adapter, "a red cube", skip_first=4, system_prompt="Draw it.")
        side = text_lib.node_text_side(adapter.config, gemma.loaded, "Draw it.", 4)
        with torch.no_grad():
            states = text_lib.encode_text(gemma.loaded, side, ["a red cube"])
            out = adapter.module(states.states, states.mask)
        torch.testing.assert_close(cond[0][0], out.context, atol=ATOL, rtol=0)
        torch.testing.assert_close(cond[0][1]["pooled_output"], out.pooled, atol=ATOL, rtol=0)
        assert "skip_first 4" in info
        assert "Gemma chat template" in info or "decoder LLM chat template" in info
        assert "warning: with this tokenizer and system prompt the template puts" in info  # 4 is not the prefix length


def test_bad_pairings_name_both_sides(nodes, t5, gemma, qwen, ella):  # noqa: F811
    errors = pack_module("adapter.errors")
    # (The published presets' own pairings, e.g. RouWei-Gemma + a T5 encoder, are checked in test_foreign_text.py:
    # a full-size RouWei file is 1.2 GB, and the small custom-size ones here accept any text model of their width.)
    with pytest.raises(errors.AdapterMismatchError, match=r"'ella-tiny.safetensors' needs a T5 encoder folder.*decoder LLM 'tiny-gemma3'"):
        encode(nodes, gemma, ella, "x")
    ours = load(nodes, "qwen-sd15.safetensors")[0]
    with pytest.raises(errors.AdapterMismatchError, match=r"'qwen-sd15.safetensors' reads every layer.*'tiny-t5' is a t5 text encoder"):
        encode(nodes, t5, ours, "x")
    with pytest.raises(errors.AdapterMismatchError, match=r"needs a T5 encoder folder.*decoder LLM 'tiny-qwen2'"):
        encode(nodes, qwen, ella, "x")


def test_an_sd15_published_adapter_is_refused_for_an_sdxl_context_width(ella):
    lib = pack_module("adapter")
    with pytest.raises(lib.AdapterMismatchError, match=r"768-wide SD1.5 context but the MODEL .* gives 2048 \(SDXL\)"):
        lib.check_context_dim(ella.config, 2048, None, "the MODEL connected to Apply LLM Diff Adapter")


def test_ella_with_clip_concat_and_strengths_through_apply(comfy, nodes, unet, t5, ella):  # noqa: F811
    """CLIP's 77 tokens after ELLA's 64 (any token count concatenates); the Apply node recomputes only ELLA's."""

    cond, info = encode(nodes, t5, ella, "a red cube", clip=FakeClip(768, 768), clip_mode="concat", llm_strength=0.5,
                        clip_strength=2.0)
    context = cond[0][0]
    assert context.shape == (1, 64 + 77, 768)
    torch.testing.assert_close(context[:, :64], ella_reference(t5, ella, "a red cube", 500.0, 0.5), atol=ATOL, rtol=0)
    assert torch.equal(context[:, 64:], torch.full((1, 77, 768), 1.0))
    assert "trained without CLIP tokens" in info
    patched, calls = recording(comfy, apply(nodes, unet, ella))
    calc_cond_batch(comfy, patched, cond, encode(nodes, t5, ella, "")[0], [sigma_of(unet, 250.0)])
    positive_calls = [c for c in calls if 0 in c["chunks"]]  # 141 and 64 tokens: ComfyUI runs them in separate calls
    assert positive_calls and all(len(c["chunks"]) == 1 for c in positive_calls)
    for call in positive_calls:
        row = call["context"][0]
        t = call["timesteps"][0]
        torch.testing.assert_close(row[:64], ella_reference(t5, ella, "a red cube", t, 0.5)[0], **BATCH_TOL)
        assert torch.equal(row[64:], torch.full((77, 768), 1.0))


@pytest.mark.parametrize("arch", ["ella", "rouwei-gemma"])
def test_a_module_trained_from_scratch_runs_with_its_recorded_text_side(nodes, qwen, gemma, arch):  # noqa: F811
    """An ELLA / RouWei module in our format (training.train --arch) reads the decoder LLM it records through its
    recorded prompt template: the node's conditioning is that text side + the module, and another LLM is named."""
    import folder_paths

    lib = pack_module("adapter")
    scratch = pack_module("adapter.foreign.scratch")
    text_lib = pack_module("adapter.foreign.text")
    template = lib.record_chat_template(lib.TemplateConfig(max_tokens=24), qwen.loaded.tokenizer)
    sizes = (scratch.EllaSizes(layers=1, heads=4, num_latents=8) if arch == "ella"
             else scratch.RouWeiSizes(n_wide_blocks=1, n_narrow_blocks=1, num_heads=4, target_seq_len=12, max_input_len=32))
    torch.manual_seed(0)
    module = scratch.fresh_module(arch, sizes, qwen.loaded, lib.make_target("sd15"), template)
    name = f"scratch-{arch}.safetensors"
    adapter_dir = Path(folder_paths.get_folder_paths("llm_adapters")[0])
    lib.save_adapter(adapter_dir / name, module, scratch.to_adapter_config(module.config))
    adapter, info = load(nodes, name)
    assert "trained by us" in info and "layout ours" in info and "recorded prompt template" in info
    cond, info = encode(nodes, qwen, adapter, "a red cube", skip_first=3)
    with torch.no_grad():
        states = text_lib.encode_text(qwen.loaded, text_lib.template_side(template), ["a red cube"])
        expected = adapter.module(states.states, states.mask, 500.0).context
    torch.testing.assert_close(cond[0][0], expected, atol=ATOL, rtol=0)
    assert cond[0][0].shape == (1, 8 if arch == "ella" else 12, 768)
    assert "skip_first are for RouWei-Gemma adapters and were ignored" in info
    with pytest.raises(pack_module("adapter.errors").AdapterMismatchError, match="built for"):
        encode(nodes, gemma, adapter, "a red cube")
