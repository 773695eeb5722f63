"""Published adapters (RouWei-Gemma, ELLA) against outputs of their reference implementations.

The data in tests/unit/data/interop/ was produced by running the reference code on small random
configurations (its constructor config is in each file's metadata); the full-size manifests list
the key -> shape of the published files.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from adapter.errors import AdapterFileError
from adapter.file_format import read_header
from adapter.foreign import ForeignConfig, file_shapes, load_any_adapter, load_foreign_adapter, recognise
from adapter.foreign.layouts import build_foreign_adapter

DATA = Path(__file__).parent / "data" / "interop"
TOL = 1e-5


def _max_err(a, b):
    return (a - b).abs().max().item()


@pytest.mark.parametrize("name", ["rouwei_small", "rouwei_small_separate_qkv"])
def test_rouwei_matches_reference(name):
    # The re-saved file has no config in its metadata: the head count comes from the original's.
    heads = json.loads(read_header(DATA / "rouwei_small.safetensors")["__metadata__"]["config"])["num_heads"]
    module = load_foreign_adapter(DATA / f"{name}.safetensors", heads=heads)
    io = load_file(DATA / "rouwei_small_io.safetensors")
    assert module.config.layout == ("rouwei-fused" if name == "rouwei_small" else "rouwei-separate-qkv")
    with torch.no_grad():
        batch = module(io["hidden_states"], io["attention_mask"])
        alone = module(io["hidden_states"][:1])  # no mask: the reference pads to max_input_len itself
    assert io["attention_mask"][1].sum() < io["attention_mask"].shape[1]  # the batch really is padded
    assert _max_err(batch.context, io["context"]) <= TOL
    assert _max_err(batch.pooled, io["pooled"]) <= TOL
    assert _max_err(alone.context, io["context_unmasked_first"]) <= TOL
    assert _max_err(alone.pooled, io["pooled_unmasked_first"]) <= TOL


def test_rouwei_head_count_matters():
    """The head count cannot be read from shapes; a wrong one must change the output (so the test above means something)."""
    module = load_foreign_adapter(DATA / "rouwei_small_separate_qkv.safetensors")  # no metadata: published default 16
    io = load_file(DATA / "rouwei_small_io.safetensors")
    with torch.no_grad():
        out = module(io["hidden_states"], io["attention_mask"])
    assert module.config.arch.num_heads == 16
    assert _max_err(out.context, io["context"]) > 1e-2


def test_ella_matches_reference():
    module = load_foreign_adapter(DATA / "ella_small.safetensors")
    io = load_file(DATA / "ella_small_io.safetensors")
    assert tuple(io["timesteps"].tolist()) == (999.0, 301.0)
    with torch.no_grad():
        batch = module(io["t5_states"], None, io["timesteps"])
        alone = module(io["t5_states"][:1], None, 500)
        # encode once, decode per timestep: the path the per-step wrapper takes
        states = module.encode_states(io["t5_states"])
        split = torch.cat([module.decode(states, None, t).context[i : i + 1] for i, t in enumerate(io["timesteps"])])
    assert module.config.timestep_aware
    assert _max_err(batch.context, io["context"]) <= TOL
    assert _max_err(alone.context, io["context_first_t500"]) <= TOL
    assert _max_err(split, io["context"]) <= TOL


def test_ella_padding_added_later_is_masked():
    """Positions we add (to batch prompts of different lengths) must not change the output."""
    module = load_foreign_adapter(DATA / "ella_small.safetensors")
    x = load_file(DATA / "ella_small_io.safetensors")["t5_states"][:1]
    with torch.no_grad():
        plain = module(x, None, 301).context
        padded = torch.nn.functional.pad(x, (0, 0, 0, 5), value=3.0)
        mask = torch.cat([torch.ones(1, x.shape[1]), torch.zeros(1, 5)], dim=1)
        masked = module(padded, mask, 301).context
        unmasked = module(padded, None, 301).context
    assert _max_err(plain, masked) <= TOL
    assert _max_err(plain, unmasked) > 1e-3


MANIFESTS = json.loads((DATA / "full_size_key_manifests.json").read_text())


def _manifest(prefix: str) -> dict:
    return next(v for k, v in MANIFESTS.items() if k.startswith(prefix))


@pytest.mark.parametrize("prefix, preset, family, encoder, arch", [
    ("rouwei_gemma_v0.1", "RouWei-Gemma (gemma-3-1b)", "sdxl", "gemma_chat",
     dict(llm_dim=1152, n_wide_blocks=2, n_narrow_blocks=3, num_heads=16, max_input_len=512, target_seq_len=308)),
    ("rouwei_t5gemma_v0.2", "RouWei-T5Gemma (t5gemma-2b encoder)", "sdxl", "t5gemma",
     dict(llm_dim=2304, n_wide_blocks=3, n_narrow_blocks=3, num_heads=16, max_input_len=512, target_seq_len=308)),
    ("ella-sd1.5-tsc-t5xl", "ELLA-SD1.5-TSC-T5XL", "sd15", "t5",
     dict(time_channel=320, time_embed_dim=768, width=768, layers=6, heads=8, num_latents=64, input_dim=2048)),
])
def test_full_size_manifests_are_recognised(prefix, preset, family, encoder, arch):
    shapes = _manifest(prefix)
    config = recognise(shapes)
    assert isinstance(config, ForeignConfig)
    assert (config.preset, config.target.family, config.text.encoder) == (preset, family, encoder)
    assert {k: getattr(config.arch, k) for k in arch} == arch
    if family == "sdxl":
        assert (config.target.num_tokens, config.target.context_dim, config.target.pooled_dim) == (308, 2048, 1280)
    else:
        assert (config.target.num_tokens, config.target.context_dim, config.target.pooled_dim) == (64, 768, None)
    # Build and load on the meta device: every manifest tensor lands in the module, no memory used.
    tensors = {k: torch.empty(v, device="meta") for k, v in shapes.items()}
    module = build_foreign_adapter(config, tensors, device="meta")
    assert sum(p.numel() for p in module.parameters()) == sum(t.numel() for t in tensors.values())


@pytest.mark.parametrize("prefix", ["rouwei_gemma_v0.1", "ella-sd1.5-tsc-t5xl"])
def test_removed_key_is_named(prefix):
    shapes = dict(_manifest(prefix))
    victim = sorted(k for k in shapes if "blocks.1." in k)[0]
    del shapes[victim]
    with pytest.raises(AdapterFileError, match="Closest: (rouwei-fused|ella-tsc)") as err:
        recognise(shapes)
    assert victim in str(err.value) and "missing" in str(err.value)


@pytest.mark.parametrize("prefix", ["rouwei_t5gemma_v0.2", "ella-sd1.5-tsc-t5xl"])
def test_changed_shape_is_named(prefix):
    shapes = dict(_manifest(prefix))
    victim = next(k for k in shapes if k.endswith("out_proj.weight"))
    shapes[victim] = [shapes[victim][0], shapes[victim][1] + 1]
    with pytest.raises(AdapterFileError, match="wrong shape") as err:
        recognise(shapes)
    assert victim in str(err.value)


def test_unrelated_file_is_refused_with_the_closest_layout(tmp_path):
    path = tmp_path / "lora.safetensors"
    save_file({"lora_unet_down.weight": torch.zeros(4, 4), "connector.latents": torch.zeros(8, 16)}, path)
    with pytest.raises(AdapterFileError, match=r"matches no known adapter layout.*Closest: ella-tsc.*missing"):
        load_any_adapter(path)


def test_own_format_still_loads_through_load_any_adapter():
    from adapter import LLMDiffAdapter

    module = load_any_adapter(DATA.parent / "static_adapter_v1.safetensors")
    assert isinstance(module, LLMDiffAdapter)


def test_file_shapes_gives_tensor_shapes_and_metadata_from_a_header():
    shapes, metadata = file_shapes(read_header(DATA / "ella_small.safetensors"))
    assert shapes["connector.latents"] == (8, 64) and "config" in metadata


def test_full_size_separate_qkv_layout_is_recognised():
    """The fork's re-saved layout of a full-size file (names as in rouwei_small_separate_qkv.safetensors)."""
    from adapter.foreign.layouts import _split_fused

    fused = {k: torch.empty(v, device="meta") for k, v in _manifest("rouwei_t5gemma_v0.2").items()}
    split = {k: tuple(v.shape) for k, v in _split_fused(fused).items()}
    small = file_shapes(read_header(DATA / "rouwei_small_separate_qkv.safetensors"))[0]
    assert {k.split(".")[-2] for k in split if "proj" in k} == {k.split(".")[-2] for k in small if "proj" in k}
    config = recognise(split)
    assert (config.layout, config.preset, config.arch.n_wide_blocks) == ("rouwei-separate-qkv", "RouWei-T5Gemma (t5gemma-2b encoder)", 3)


@pytest.mark.parametrize("name", ["rouwei_small", "rouwei_small_separate_qkv", "ella_small"])
def test_save_writes_back_the_reference_files_own_layout(name, tmp_path):
    """The reference implementations' files, loaded and saved again (what the trainer's export does): the same
    tensors under the same names, bit for bit, the head count in `config`, provenance beside it, no `format`."""
    from safetensors import safe_open

    from adapter.foreign import TRAINING_METADATA_KEY, save_foreign_adapter

    source = DATA / f"{name}.safetensors"
    module = load_foreign_adapter(source)
    out = save_foreign_adapter(tmp_path / "out.safetensors", module, {"steps": 3})
    original, written = load_file(source), load_file(out)
    assert written.keys() == original.keys()
    for key, value in written.items():
        assert torch.equal(value, original[key]), key
    with safe_open(str(out), framework="pt") as f:
        metadata = f.metadata()
    assert "format" not in metadata and json.loads(metadata[TRAINING_METADATA_KEY]) == {"steps": 3}
    again = load_foreign_adapter(out)
    assert again.config.layout == module.config.layout and again.config.arch == module.config.arch
