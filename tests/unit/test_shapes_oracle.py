"""bench/shapes/oracle.py: argument checks, caption choice, the per-caption layout, and that optimising a
context against a frozen UNet lowers its epsilon-MSE on a fixed batch (a tiny random UNet, seconds)."""
import numpy as np
import pytest
import torch

from bench.shapes.oracle import (OracleConfig, _per_caption, fixed_batch_eps, main, optimise_contexts,
                                 oracle_captions, validate)


@pytest.mark.parametrize("field, value, message", [
    ("captions", 0, "--captions must be at least 1"),
    ("steps", -1, "--steps must be at least 1"),
    ("sampler_steps", 0, "--sampler-steps must be at least 1"),
    ("lr", 0.0, "--lr must be positive"),
    ("kinds", ("pair", "triple"), "--kinds must name scene kinds"),
    ("kinds", (), "--kinds must name scene kinds"),
])
def test_bad_settings_are_refused_with_what_they_must_be(field, value, message):
    with pytest.raises(ValueError, match=message):
        validate(OracleConfig(**{field: value}))


def test_the_command_refuses_bad_arguments_and_missing_assets(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--assets", str(tmp_path), "--samples", "0"])
    assert "--samples must be at least 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--assets", str(tmp_path)])
    assert "make shapes-assets" in capsys.readouterr().err


def test_captions_are_distinct_held_out_two_object_scenes():
    from bench.shapes.captions import parse_caption
    from bench.shapes.splits import HELDOUT, HOLDOUTS

    captions = oracle_captions(40)
    specs = [parse_caption(c) for c in captions]
    assert len(captions) == 40 and len(set(specs)) == 40
    assert all(s.kind in ("pair", "relation") and HELDOUT.combinations_in(s) for s in specs)
    assert oracle_captions(5, ("relation",)) == oracle_captions(60, ("relation",))[:5]  # a prefix, whatever n
    scenes = [parse_caption(c) for c in oracle_captions(20, holdout="scenes")]  # the assets' holdout's captions
    assert all(s.kind in ("pair", "relation") and HOLDOUTS["scenes"].combinations_in(s) for s in scenes)


def test_per_caption_means_follow_the_sampling_layout():
    # 2 captions x 2 samples: sample k of caption i is entry k * 2 + i; "relation" applies to caption 1 only
    checks = [{"colour": True}, {"colour": False, "relation": True},
              {"colour": True}, {"colour": True, "relation": False}]
    out = _per_caption(checks, 2)
    np.testing.assert_allclose(out["colour"], [[1.0, 0.5]])
    np.testing.assert_allclose(out["relation"], [[0.5]])  # over the captions it applies to


@pytest.fixture(scope="module")
def tiny_base():
    from diffusers import DDPMScheduler

    from bench.shapes.tiny_base import SD_SCHEDULER, make_unet
    from training.models import BaseModel

    torch.manual_seed(0)
    unet = make_unet((16, 32, 32), context_dim=16, latent_size=8, latent_channels=4).eval()
    return BaseModel("sd15", unet, None, DDPMScheduler(**SD_SCHEDULER), [], [], "tiny")


def test_optimising_the_context_lowers_eps_mse_on_a_fixed_batch_and_leaves_the_unet_alone(tiny_base):
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 3, 4, 8, 8, generator=gen)  # 2 captions x 3 renders
    start = torch.randn(2, 77, 16, generator=gen)
    t = torch.randint(1000, (2, 3), generator=gen)
    noise = torch.randn(latents.shape, generator=gen)
    weights = [p.detach().clone() for p in tiny_base.unet.parameters()]
    with torch.no_grad():
        before = fixed_batch_eps(tiny_base, start, latents, t, noise)
    contexts, losses = optimise_contexts(tiny_base, start, latents, steps=40, lr=5e-2, batch=3, generator=gen,
                                         log_every=0)
    with torch.no_grad():
        after = fixed_batch_eps(tiny_base, contexts, latents, t, noise)
    assert len(losses) == 40 and contexts.shape == start.shape and not contexts.requires_grad
    assert (after < before).all(), (before, after)
    assert all(torch.equal(w, p) for w, p in zip(weights, tiny_base.unet.parameters()))
    assert not torch.equal(contexts, start)
