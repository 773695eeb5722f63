"""LLMDiffApplyAdapter in-process, inside ComfyUI's real sampling code.

ComfyUI's own convert_cond / process_conds / calc_cond_batch, its KSampler and KSamplerAdvanced nodes and
core conditioning nodes run on a tiny random UNet of the SD1.5 layout (768-wide context, ComfyUI's SD15
model config and discrete eps sampling), with our real nodes and a tiny Qwen2 (real tokenizer). A test-only
APPLY_MODEL wrapper records what every UNet call received; references are computed with the adapter
library alone, one prompt at a time (`reference`), never through the code under test.
"""
from __future__ import annotations

import logging
import types
from pathlib import Path

import pytest
import torch

from support.adapters import trained_like
from support.node_models import node_models, qwen  # noqa: F401  (fixtures; env = node_models)
from devkit.comfy_pack import pack_module
from support.sampling import ATOL, apply, calc_cond_batch, comfy, ksample, one_thread, recording, sigma_of, unet  # noqa: F401

LONG = "a red cube on a wooden table, photographed at noon with soft shadows and a blue wall behind it"


@pytest.fixture(scope="module")
def nodes(env):  # noqa: F811
    return env[1]


@pytest.fixture(scope="module")
def aware(env, nodes):  # noqa: F811
    """A timestep-aware adapter whose modulation has values (at init it equals the static adapter for every t)."""
    import folder_paths

    lib = pack_module("adapter")
    folder = Path(folder_paths.get_folder_paths("llm_adapters")[0])
    module = trained_like(lib.load_adapter(folder / "qwen-sd15-timestep.safetensors"))
    lib.save_adapter(folder / "qwen-sd15-timestep-trained.safetensors", module)
    return nodes["LLMDiffLoadAdapter"].execute("qwen-sd15-timestep-trained.safetensors").args[0]


@pytest.fixture(scope="module")
def static(nodes):
    return nodes["LLMDiffLoadAdapter"].execute("qwen-sd15.safetensors").args[0]


@pytest.fixture
def encode(nodes, qwen):  # noqa: F811
    """text -> CONDITIONING from LLMDiffTextEncode; remembers which prompt made which states (for `reference`)."""
    pack_module("nodes.encode").ENCODE_CACHE.clear()
    key = pack_module("nodes.timestep_aware.model_cond").STATES_KEY
    texts = {}

    def run(adapter, text, **kwargs):
        cond, _ = nodes["LLMDiffTextEncode"].execute(qwen, adapter, text, **kwargs).args
        holder = cond[0][1].get("model_conds", {}).get(key)
        if holder is not None:
            texts[id(holder.cond)] = (adapter, text, kwargs.get("llm_strength", 1.0))
        return cond

    run.texts = texts
    return run


def reference(qwen, adapter, text, t, strength=1.0):  # noqa: F811
    """The adapter library alone, this one prompt, at timestep t."""
    lib = pack_module("adapter")
    with torch.no_grad():
        enc = lib.encode_prompts(qwen.loaded, adapter.config.template, [text])
        return adapter.module(enc.hidden_states.float(), enc.attention_mask, timesteps=t).context * strength


def at_timesteps(conditioning, encode, qwen, timesteps):  # noqa: F811
    """`conditioning` with each of our entries' adapter tokens recomputed on its own at `timesteps` (one per
    sample) and the states key removed: what the wrapper must be equivalent to."""
    key = pack_module("nodes.timestep_aware.model_cond").STATES_KEY
    out = []
    for context, extras in conditioning:
        holder = extras.get("model_conds", {}).get(key)
        if holder is None:
            out.append([context, extras])
            continue
        adapter, text, strength = encode.texts[id(holder.cond)]
        steps = list(dict.fromkeys(timesteps))
        rows = torch.cat([reference(qwen, adapter, text, t, strength) for t in (steps if len(steps) == 1 else timesteps)])
        n = holder.cond.num_tokens
        new = torch.cat([rows, context[:, n:].expand(rows.shape[0], -1, -1)], dim=1)
        model_conds = {k: v for k, v in extras["model_conds"].items() if k != key}
        out.append([new, {**extras, "model_conds": model_conds}])
    return out


def clip_like(value=0.3, tokens=77):
    """A CLIP-shaped plain conditioning entry (no states)."""
    return [[torch.full((1, tokens, 768), value), {}]]


# --- batching against the reference ----------------------------------------------------------------

@pytest.mark.parametrize("per_sample", [False, True], ids=["one-timestep", "per-sample-timesteps"])
def test_several_entries_match_a_reference_that_recomputes_each_alone(comfy, nodes, unet, aware, encode, qwen, per_sample):  # noqa: F811
    n = comfy.nodes
    area = n.ConditioningSetArea().append(encode(aware, "a cat", llm_strength=0.7), 32, 32, 0, 0, 1.0)[0]
    concat = n.ConditioningConcat().concat(encode(aware, "blue sky"), clip_like())[0]
    positive = n.ConditioningCombine().combine(n.ConditioningCombine().combine(encode(aware, LONG), area)[0], concat)[0]
    negative = encode(aware, "") + clip_like(-0.2)
    sigmas = [sigma_of(unet, 800.0), sigma_of(unet, 150.0)] if per_sample else [sigma_of(unet, 600.0)] * 2
    timesteps = unet.model.model_sampling.timestep(torch.tensor(sigmas)).tolist()

    patched, calls = recording(comfy, apply(nodes, unet, aware))
    got = calc_cond_batch(comfy, patched, positive, negative, sigmas)
    plain, ref_calls = recording(comfy, unet)
    expected = calc_cond_batch(comfy, plain, at_timesteps(positive, encode, qwen, timesteps),
                               at_timesteps(negative, encode, qwen, timesteps), sigmas)

    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=ATOL, rtol=1e-4)
    record = calls[0]["record"]
    # 3 positive entries + 1 negative of ours, plus the copy of our negative that ComfyUI adds for the
    # area (create_cond_with_same_area_if_none); 4 distinct prompts' states, decoded once per timestep.
    assert record["recomputed"] == 5 and record["decoded"] == 4 * len(set(timesteps))
    assert all(c["record"] == record for c in calls)
    if not per_sample:  # the same batching as the reference: positive and negative still share UNet calls
        assert [c["chunks"] for c in calls] == [c["chunks"] for c in ref_calls]


def test_contexts_are_shared_per_timestep_and_entry_within_a_call(comfy, nodes, unet, aware, encode):
    n = comfy.nodes
    cond = encode(aware, "a red circle")
    # Three entries, one prompt: SetTimestepRange and SetArea copy the entry and keep its states.
    positive = (cond + n.ConditioningSetTimestepRange().set_range(cond, 0.0, 1.0)[0]
                + n.ConditioningSetArea().append(cond, 32, 32, 0, 0, 1.0)[0])
    patched, calls = recording(comfy, apply(nodes, unet, aware))
    calc_cond_batch(comfy, patched, positive, encode(aware, ""), [sigma_of(unet, 300.0)])
    assert calls[0]["record"]["recomputed"] == 5 and calls[0]["record"]["decoded"] == 2


# --- whole sampling runs: every sampler family -------------------------------------------------------

RUNS = {
    "euler": dict(sampler="euler", scheduler="normal"),
    "dpmpp_2m-karras": dict(sampler="dpmpp_2m", scheduler="karras"),
    "denoise-0.6": dict(sampler="euler", scheduler="normal", denoise=0.6),
    "advanced-steps-1-3": dict(sampler="euler", scheduler="normal", advanced=(1, 3)),
}


@pytest.mark.parametrize("run", sorted(RUNS))
def test_every_unet_call_gets_the_context_at_its_own_timestep(comfy, nodes, unet, aware, encode, qwen, run):  # noqa: F811
    positive, negative = encode(aware, "a red cube"), encode(aware, "")
    patched, calls = recording(comfy, apply(nodes, unet, aware))
    samples = ksample(comfy, patched, positive, negative, **RUNS[run])
    assert torch.isfinite(samples).all()

    full_model, full = recording(comfy, apply(nodes, unet, aware))
    ksample(comfy, full_model, positive, negative)  # euler, normal, 4 steps, denoise 1: the full schedule
    steps = [c["timesteps"][0] for c in calls]
    full_steps = [c["timesteps"][0] for c in full]
    assert len(set(steps)) == len(steps) >= 2 and steps == sorted(steps, reverse=True)
    if run == "advanced-steps-1-3":
        assert steps == full_steps[1:3]  # exactly the schedule's steps 1 and 2
    if run == "denoise-0.6":
        assert steps[0] < full_steps[0] - 100  # starts part-way down the schedule
    for call in calls:
        t = call["timesteps"][0]
        assert call["timesteps"] == [t] * len(call["timesteps"])
        assert call["record"]["recomputed"] == 2
        for chunk, which in enumerate(call["chunks"]):  # positive and negative batched: 2 latents each
            text = "a red cube" if which == 0 else ""
            rows = call["context"][2 * chunk : 2 * chunk + 2]
            expected = reference(qwen, aware, text, t).expand(2, -1, -1)
            torch.testing.assert_close(rows, expected, atol=ATOL, rtol=0)
    assert (calls[0]["context"] - calls[-1]["context"]).abs().max() > 1e-3, "the context did not change with the timestep"


def test_static_adapter_through_the_node_is_bit_identical_and_the_wrapper_ran(comfy, nodes, unet, static, encode):
    positive, negative = encode(static, "a red cube"), encode(static, "")
    plain = ksample(comfy, unet, positive, negative, sampler="dpmpp_2m", scheduler="karras")
    patched, calls = recording(comfy, apply(nodes, unet, static))
    assert torch.equal(ksample(comfy, patched, positive, negative, sampler="dpmpp_2m", scheduler="karras"), plain)
    assert calls and all(c["record"] is not None and c["record"]["entries"] == 2 and c["record"]["recomputed"] == 0 for c in calls)


# --- without the node: the extra model cond is harmless -------------------------------------------------

def test_without_the_node_the_states_reach_the_unet_and_change_nothing(comfy, unet, aware, encode):
    key = pack_module("nodes.timestep_aware.model_cond").STATES_KEY
    positive, negative = encode(aware, "a red cube"), encode(aware, "")
    stripped = lambda cond: [[c, {k: v for k, v in e.items() if k != "model_conds"}] for c, e in cond]  # noqa: E731
    with_states, calls = recording(comfy, unet)
    samples = ksample(comfy, with_states, positive, negative)
    without, plain_calls = recording(comfy, unet)
    assert torch.equal(samples, ksample(comfy, without, stripped(positive), stripped(negative)))
    assert all(key in c["kwargs"] and c["record"] is None for c in calls)  # passed to the UNet, which ignores it
    assert len(calls) == len(plain_calls) == 4 and all(sorted(c["chunks"]) == [0, 1] for c in calls)  # still one UNet call per step


def test_a_clip_negative_batches_with_our_positive_only_through_the_node(comfy, nodes, unet, aware, encode):
    """ComfyUI batches entries only when they carry the same model_conds keys (documented in docs/nodes.md)."""
    positive, negative = encode(aware, "a red cube"), clip_like()
    plain, plain_calls = recording(comfy, unet)
    ksample(comfy, plain, positive, negative, steps=2)
    patched, calls = recording(comfy, apply(nodes, unet, aware))
    ksample(comfy, patched, positive, negative, steps=2)
    assert len(plain_calls) == 4 and len(calls) == 2


# --- errors and model handling ---------------------------------------------------------------------

def test_conditioning_from_another_adapter_is_a_clear_error(comfy, nodes, unet, aware, encode):
    other = nodes["LLMDiffLoadAdapter"].execute("qwen-sd15-timestep.safetensors").args[0]
    patched = apply(nodes, unet, other)
    with pytest.raises(pack_module("adapter").AdapterMismatchError, match="qwen-sd15-timestep-trained.*qwen-sd15-timestep.safetensors"):
        ksample(comfy, patched, encode(aware, "a red cube"), encode(aware, ""), steps=1)


def test_the_adapter_width_is_checked_against_the_model(nodes, unet):
    sdxl = nodes["LLMDiffLoadAdapter"].execute("qwen-sdxl.safetensors").args[0]
    expected = r"2048-wide SDXL context but the MODEL connected to Apply LLM Diff Adapter gives 768"
    with pytest.raises(pack_module("adapter").AdapterMismatchError, match=expected):
        apply(nodes, unet, sdxl)
    no_context = types.SimpleNamespace(model=types.SimpleNamespace(model_config=types.SimpleNamespace(unet_config={"in_channels": 16})))
    with pytest.raises(ValueError, match="no cross-attention context width"):
        apply(nodes, no_context, sdxl)


def test_the_input_model_is_not_changed_and_the_adapter_loads_with_the_unet(comfy, nodes, unet, aware):
    wrappers_before = {k: {kk: list(v) for kk, v in d.items()} for k, d in unet.wrappers.items()}
    patched = apply(nodes, unet, aware)
    twice = apply(nodes, patched, nodes["LLMDiffLoadAdapter"].execute("qwen-sd15-timestep.safetensors").args[0])
    assert patched is not unet and unet.wrappers == wrappers_before and not unet.additional_models
    wrapper_key = pack_module("nodes.timestep_aware.wrapper").WRAPPER_KEY
    [wrapper] = twice.get_wrappers(comfy.ext.WrappersMP.CALC_COND_BATCH, wrapper_key)  # one wrapper, both adapters
    assert len(wrapper.adapters) == 2 and len(patched.get_wrappers(comfy.ext.WrappersMP.CALC_COND_BATCH, wrapper_key)[0].adapters) == 1
    [adapter_patcher] = patched.get_additional_models()
    assert adapter_patcher.model is aware.patcher.model and adapter_patcher.load_device == unet.load_device


def test_entries_changed_by_other_nodes(comfy, nodes, unet, aware, encode, qwen, caplog):  # noqa: F811
    """Concat keeps our tokens first (recomputed, tail kept); Average and ZeroOut changed them (left alone, warned)."""
    n = comfy.nodes
    cases = {
        "concat": n.ConditioningConcat().concat(encode(aware, "a red cube"), clip_like())[0],
        "average": n.ConditioningAverage().addWeighted(encode(aware, "a red cube"), clip_like(), 0.5)[0],
        "zero": n.ConditioningZeroOut().zero_out(encode(aware, "a red cube"))[0],
    }
    sigma = sigma_of(unet, 100.0)
    for name, positive in cases.items():
        patched, calls = recording(comfy, apply(nodes, unet, aware))
        with caplog.at_level(logging.WARNING):
            calc_cond_batch(comfy, patched, positive, clip_like(tokens=154 if name == "concat" else 77), [sigma])
        [call] = calls
        row = call["context"][call["chunks"].index(0)]
        t = call["timesteps"][0]
        if name == "concat":
            torch.testing.assert_close(row[:77], reference(qwen, aware, "a red cube", t)[0], atol=ATOL, rtol=0)
            assert torch.equal(row[77:], positive[0][0][0, 77:])
        else:
            assert torch.equal(row, positive[0][0][0]) and call["record"]["recomputed"] == 0
            assert "was changed by another node" in caplog.text


def test_info_points_to_the_apply_node(nodes, qwen, aware):  # noqa: F811
    _, info = nodes["LLMDiffTextEncode"].execute(qwen, aware, "a red circle").args
    assert "fixed timestep 500" in info and "Apply LLM Diff Adapter (timestep-aware)" in info
