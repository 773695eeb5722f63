"""Timestep-aware adapter: equal to the static adapter at init, the split encode/decode path,
timestep handling and errors, and the file format (old static files unchanged, timestep-aware round trip)."""
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from adapter.errors import ConfigError
from adapter.file_format import load_adapter, read_adapter_config, save_adapter
from adapter.model import FALLBACK_TIMESTEP, EncodedStates, timestep_embedding
from support.adapters import HIDDEN, LAYERS, make_adapter, make_config, trained_like

DATA = Path(__file__).parent / "data"
# Written by adapter/model.py as committed before the timestep-aware mode existed (commit a3057ba),
# with the inputs and outputs it gave then: the contract that static files keep loading unchanged.
OLD_STATIC_FILE = DATA / "static_adapter_v1.safetensors"
OLD_STATIC_IO = DATA / "static_adapter_v1_io.safetensors"


def inputs(batch=3, length=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(-1, 2, LAYERS + 1).view(1, -1, 1, 1)
    states = torch.randn(batch, LAYERS + 1, length, HIDDEN, generator=g) * scales
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, 4:] = 0  # one padded prompt, so the masked paths run too
    return states, mask


def test_timestep_embedding_is_diffusers_unet_embedding():
    from diffusers.models.embeddings import get_timestep_embedding

    t = torch.tensor([0.0, 1.0, 250.5, 999.0])
    expected = get_timestep_embedding(t, 256, flip_sin_to_cos=True, downscale_freq_shift=0)
    torch.testing.assert_close(timestep_embedding(t), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("target, blocks", [("custom", 1), ("custom", 2), ("sd15", 1)])
def test_at_init_equals_static_adapter_for_any_timestep(target, blocks):
    """Same seed -> the same common weights; zero modulation -> bit-identical outputs at every t."""
    static, aware = make_adapter(False, target=target), make_adapter(True, target=target, timestep_blocks=blocks)
    aware_weights = aware.state_dict()
    for name, tensor in static.state_dict().items():
        assert torch.equal(aware_weights[name], tensor), name
    states, mask = inputs()
    with torch.no_grad():
        reference = static(states, mask)
        for t in (0, 1, 250.5, FALLBACK_TIMESTEP, 999, torch.tensor([3, 500, 990])):
            out = aware(states, mask, t)
            assert torch.equal(out.context, reference.context), t
            assert (out.pooled is None and reference.pooled is None) or torch.equal(out.pooled, reference.pooled)


def test_static_weights_load_into_a_timestep_aware_adapter():
    """Fine-tuning a static adapter into a timestep-aware one: only the new tensors are missing."""
    static, aware = make_adapter(False, seed=1), make_adapter(True, seed=2)
    result = aware.load_state_dict(static.state_dict(), strict=False)
    assert result.unexpected_keys == []
    assert result.missing_keys and all(".modulation." in k or k.startswith("timestep_mlp.") for k in result.missing_keys)
    states, mask = inputs()
    with torch.no_grad():
        assert torch.equal(aware(states, mask, 800).context, static(states, mask).context)


def test_static_adapter_accepts_and_ignores_timesteps():
    adapter = make_adapter(False)
    states, mask = inputs()
    with torch.no_grad():
        reference = adapter(states, mask)
        for t in (0, 999, torch.tensor([1, 2, 3])):
            assert torch.equal(adapter(states, mask, t).context, reference.context)


@pytest.mark.parametrize("blocks", [1, 2])
def test_context_follows_the_timestep_and_the_pooled_vector_does_not(blocks):
    adapter = trained_like(make_adapter(True, timestep_blocks=blocks))
    states, mask = inputs()
    with torch.no_grad():
        early, late = adapter(states, mask, 999), adapter(states, mask, 10)
        fallback = adapter(states, mask)
        at_fallback = adapter(states, mask, torch.tensor(FALLBACK_TIMESTEP))
    assert (early.context - late.context).abs().max() > 1e-3
    assert torch.equal(early.pooled, late.pooled)  # the pooled head reads the t-independent tokens
    assert torch.equal(fallback.context, at_fallback.context)


def test_per_sample_timesteps_equal_separate_calls():
    adapter = trained_like(make_adapter(True))
    states, mask = inputs()
    times = torch.tensor([20, 480, 930])
    with torch.no_grad():
        batched = adapter(states, mask, times).context
        for i, t in enumerate(times.tolist()):
            alone = adapter(states[i:i + 1, :, : int(mask[i].sum())], mask[i:i + 1, : int(mask[i].sum())], float(t))
            torch.testing.assert_close(batched[i:i + 1], alone.context, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("timestep_aware, blocks", [(False, 1), (True, 1), (True, 2)])
def test_encode_then_decode_equals_forward(timestep_aware, blocks):
    adapter = trained_like(make_adapter(timestep_aware, timestep_blocks=blocks))
    states, mask = inputs()
    with torch.no_grad():
        encoded = adapter.encode_states(states, mask)
        for t in (None, 0, 617.25, torch.tensor([5, 400, 999])):
            direct, split = adapter(states, mask, t), adapter.decode(encoded, mask, t)
            assert torch.equal(split.context, direct.context)
            assert torch.equal(split.pooled, direct.pooled)


def test_cached_entries_batch_with_cat():
    """What the ComfyUI wrapper does: encode each entry once, batch the cached parts per step."""
    adapter = trained_like(make_adapter(True))
    states, mask = inputs()
    with torch.no_grad():
        parts = [adapter.encode_states(states[i:i + 1], mask[i:i + 1]) for i in range(3)]
        batched = adapter.decode(EncodedStates.cat(parts), mask, torch.tensor([100, 200, 300]))
        reference = adapter(states, mask, torch.tensor([100, 200, 300]))
    torch.testing.assert_close(batched.context, reference.context, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(batched.pooled, reference.pooled, rtol=1e-5, atol=1e-5)


def test_modulation_receives_gradient_at_init():
    """Zero-initialised adaLN must still learn: its weights get a gradient from the very first step."""
    adapter = make_adapter(True, timestep_blocks=2).train()
    states, mask = inputs()
    adapter(states, mask, torch.tensor([10, 500, 900])).context.square().mean().backward()
    for block in adapter.resampler:
        assert block.modulation[1].weight.grad.abs().sum() > 0


def test_only_the_last_timestep_blocks_are_modulated():
    adapter = make_adapter(True, timestep_blocks=1)
    assert [block.modulation is not None for block in adapter.resampler] == [False, True]
    with pytest.raises(ConfigError, match="timestep_blocks"):
        make_config(True, timestep_blocks=3).validate()


@pytest.mark.parametrize("timesteps, message", [
    (torch.tensor([1.0, 2.0]), r"\[batch\] = \[3\]"),
    (torch.zeros(3, 1), r"\[batch\] = \[3\]"),
    (-1, r"\[0, 1000\]"),
    (1500.0, r"\[0, 1000\]"),
    (float("nan"), r"\[0, 1000\]"),
    (torch.tensor(True), "real numbers"),
])
def test_bad_timesteps_are_refused_with_the_expected_form(timesteps, message):
    adapter = make_adapter(True)
    states, mask = inputs()
    with pytest.raises((ValueError, TypeError), match=message):
        adapter(states, mask, timesteps)


def test_decode_checks_the_mask_against_the_encoded_states():
    adapter = make_adapter(True)
    states, mask = inputs()
    encoded = adapter.encode_states(states, mask)
    with pytest.raises(ValueError, match="attention_mask must be"):
        adapter.decode(encoded, mask[:, :5], 100)


# ----------------------------------------------------------------------------- file format


def test_old_static_file_loads_bit_identically_and_gives_its_old_outputs(tmp_path):
    adapter = load_adapter(OLD_STATIC_FILE)
    assert not adapter.timestep_aware and not adapter.config.arch.timestep_aware
    stored = load_file(OLD_STATIC_FILE)
    loaded = adapter.state_dict()
    assert set(loaded) == set(stored)
    assert all(torch.equal(loaded[k], stored[k]) for k in stored)

    io = load_file(OLD_STATIC_IO)
    with torch.no_grad():
        out = adapter(io["hidden_states"], io["attention_mask"])
        out_with_t = adapter(io["hidden_states"], io["attention_mask"], 321)
    # Tolerance only for float rounding on another CPU; on one machine the outputs are bit-identical.
    torch.testing.assert_close(out.context, io["context"], rtol=0, atol=1e-6)
    torch.testing.assert_close(out.pooled, io["pooled"], rtol=0, atol=1e-6)
    assert torch.equal(out_with_t.context, out.context)

    resaved = load_file(save_adapter(tmp_path / "again.safetensors", adapter))
    assert set(resaved) == set(stored) and all(torch.equal(resaved[k], stored[k]) for k in stored)


def test_timestep_aware_file_round_trip(tmp_path):
    adapter = trained_like(make_adapter(True, target="sdxl"))
    path = save_adapter(tmp_path / "aware.safetensors", adapter)
    assert read_adapter_config(path).arch.timestep_aware is True
    with safe_open(str(path), "pt") as f:
        names = set(f.keys())
    assert "timestep_mlp.0.weight" in names and "resampler.1.modulation.1.weight" in names

    loaded = load_adapter(path)
    assert loaded.timestep_aware
    states, mask = inputs()
    with torch.no_grad():
        for t in (0, 333, 999):
            a, b = adapter(states, mask, t), loaded(states, mask, t)
            assert torch.equal(a.context, b.context) and torch.equal(a.pooled, b.pooled)


# ----------------------------------------------------------------------------- trainer


def test_trainer_config_switches_the_mode():
    from training.config import resolve_config

    assert resolve_config([])[0].arch.timestep_aware is False
    assert resolve_config(["--preset", "timestep-aware"])[0].arch.timestep_aware is True
    assert resolve_config(["--set", "arch.timestep_aware=true"])[0].arch.timestep_aware is True


def test_student_conditions_the_adapter_on_each_samples_training_timestep(monkeypatch):
    """Student.forward with stand-ins for the frozen models: the context it hands the UNet must be the
    adapter's output at each sample's own training timestep (not the fallback, not another sample's)."""
    from types import SimpleNamespace

    from training import conditioning, train
    from training.config import TrainConfig

    adapter = trained_like(make_adapter(True))
    states, mask = inputs()
    seen = {}

    def predict_eps(x_t, timesteps, context, pooled, sizes):
        seen["context"] = context
        return x_t

    base = SimpleNamespace(scheduler=SimpleNamespace(add_noise=lambda latents, noise, t: latents + noise),
                           predict_eps=predict_eps)
    loss_fn = type("Loss", (), {"needs_teacher": lambda self, step, total: False,
                                "__call__": lambda self, noise, eps, teacher, t, step, total: (eps.mean(), {})})()
    monkeypatch.setattr(conditioning, "encode_prompts",
                        lambda llm, template, prompts: SimpleNamespace(hidden_states=states, attention_mask=mask))
    student = train.Student(adapter, base, None, loss_fn, TrainConfig(), train.PhaseTimer(torch.device("cpu"), False),
                            adapter.config.template)
    timesteps = torch.tensor([15, 420, 987])
    latents = torch.zeros(3, 4, 2, 2)
    with torch.no_grad():
        student(latents, latents, timesteps, ["a", "b", "c"], None, 0, 10)
        expected = adapter(states, mask, timesteps).context
        at_fallback = adapter(states, mask).context
    assert torch.equal(seen["context"], expected)
    assert not torch.equal(seen["context"], at_fallback)


def test_a_header_length_with_low_byte_0x80_is_not_mistaken_for_a_pickle(tmp_path):
    """A pickle starts with byte 0x80, and so does a safetensors file whose header is 128 + 256k bytes long
    (adding ArchConfig.timestep_blocks made a test adapter's header hit exactly that)."""
    import dataclasses
    import struct

    adapter = make_adapter(True)
    for pad in range(300):
        config = dataclasses.replace(adapter.config, training={"note": "x" * pad})
        path = save_adapter(tmp_path / "a.safetensors", adapter, config)
        (header_len,) = struct.unpack("<Q", path.read_bytes()[:8])
        if header_len % 256 == 0x80:
            break
    else:
        pytest.fail("no padding gave a header length with low byte 0x80")
    assert load_adapter(path).config.training["note"] == "x" * pad
