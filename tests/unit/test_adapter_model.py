"""LLMDiffAdapter: shapes, padding independence, fusion variants, output level, size, input checks."""
import pytest
import torch

from adapter.attention import attention
from adapter.config import TARGETS, AdapterConfig, ArchConfig, LLMInfo, make_target
from adapter.errors import AdapterMismatchError, ConfigError
from adapter.model import LLMDiffAdapter

HIDDEN, LAYERS = 32, 3  # a tiny "LLM": 3 blocks -> 4 hidden states of width 32


def make_config(target="sd15", tokens=77, hidden=HIDDEN, layers=LAYERS, arch=None, **target_kw):
    return AdapterConfig(
        llm=LLMInfo("TinyForCausalLM", "tiny", hidden, layers, "tokfp1:" + "0" * 64),
        target=make_target(target, tokens, **target_kw),
        arch=arch or ArchConfig(width=64, heads=4, refiner_layers=1, resampler_layers=1),
    )


def make_adapter(seed=0, **kw):
    torch.manual_seed(seed)
    return LLMDiffAdapter(make_config(**kw)).eval()


def random_states(batch=2, length=9, hidden=HIDDEN, layers=LAYERS, seed=1):
    g = torch.Generator().manual_seed(seed)
    # Decoder states vary wildly in scale across layers; mimic that so normalisation matters.
    scales = torch.logspace(-1, 2, layers + 1).view(1, -1, 1, 1)
    return torch.randn(batch, layers + 1, length, hidden, generator=g) * scales


@pytest.mark.parametrize("tokens", [77, 154])
@pytest.mark.parametrize("target, kw, context_dim, pooled_dim", [
    ("sd15", {}, 768, None),
    ("sd2", {}, 1024, None),
    ("sdxl", {}, 2048, 1280),
    ("custom", {"context_dim": 320, "pooled_dim": 96}, 320, 96),
])
def test_output_shapes(target, kw, context_dim, pooled_dim, tokens):
    adapter = make_adapter(target=target, tokens=tokens, **kw)
    mask = torch.ones(2, 9, dtype=torch.long)
    with torch.no_grad():
        out = adapter(random_states(), mask)
    assert out.context.shape == (2, tokens, context_dim)
    if pooled_dim is None:
        assert out.pooled is None
    else:
        assert out.pooled.shape == (2, pooled_dim)


def test_prompt_alone_equals_prompt_in_padded_batch():
    """Right padding (with garbage, even NaN, in the padded states) must not change a prompt's output."""
    adapter = make_adapter(target="sdxl")
    short = random_states(batch=1, length=5, seed=2)
    long = random_states(batch=1, length=11, seed=3)
    batch = torch.full((2, LAYERS + 1, 11, HIDDEN), float("nan"))
    batch[0, :, :5] = short[0]
    batch[1] = long[0]
    mask = torch.zeros(2, 11, dtype=torch.long)
    mask[0, :5] = 1
    mask[1] = 1
    with torch.no_grad():
        alone = adapter(short, torch.ones(1, 5, dtype=torch.long))
        padded = adapter(batch, mask)
    torch.testing.assert_close(padded.context[0], alone.context[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(padded.pooled[0], alone.pooled[0], rtol=1e-5, atol=1e-5)
    # ...and the other prompt really is different, so the comparison above is not vacuous.
    assert not torch.allclose(padded.context[1], alone.context[0], atol=1e-3)


def test_fusion_last_reads_only_the_last_layer():
    last = make_adapter(arch=ArchConfig(width=64, heads=4, refiner_layers=1, resampler_layers=1, fusion="last"))
    states = random_states()
    changed = states.clone()
    changed[:, :-1] = torch.randn_like(changed[:, :-1]) * 50  # every layer but the last
    mask = torch.ones(2, 9, dtype=torch.long)
    with torch.no_grad():
        assert torch.equal(last(states, mask).context, last(changed, mask).context)
        changed_last = states.clone()
        changed_last[:, -1] += 1.0
        assert not torch.allclose(last(states, mask).context, last(changed_last, mask).context)


def test_fusion_all_reads_every_layer_and_differs_from_last():
    arch = dict(width=64, heads=4, refiner_layers=1, resampler_layers=1)
    every = make_adapter(seed=0, arch=ArchConfig(**arch, fusion="all"))
    last = make_adapter(seed=0, arch=ArchConfig(**arch, fusion="last"))
    # The layer weights start uniform.
    assert torch.equal(torch.softmax(every.layer_logits, 0), torch.full((LAYERS + 1,), 1 / (LAYERS + 1)))
    states = random_states()
    mask = torch.ones(2, 9, dtype=torch.long)
    first_changed = states.clone()
    first_changed[:, 0] = torch.randn_like(first_changed[:, 0])
    with torch.no_grad():
        assert not torch.allclose(every(states, mask).context, every(first_changed, mask).context, atol=1e-4)
        assert not torch.allclose(every(states, mask).context, last(states, mask).context, atol=1e-3)


@pytest.mark.parametrize("hidden_scale", [0.01, 1.0, 300.0])
def test_default_adapter_output_rms_is_about_one_at_init(hidden_scale):
    """Whatever the LLM's scale, a fresh default-size adapter gives a CLIP-like level (RMS ~1)."""
    torch.manual_seed(0)
    adapter = LLMDiffAdapter(make_config(target="sdxl", arch=ArchConfig())).eval()
    with torch.no_grad():
        out = adapter(random_states(length=12) * hidden_scale, torch.ones(2, 12, dtype=torch.long))
    assert 0.9 < out.context.pow(2).mean().sqrt().item() < 1.1
    assert 0.9 < out.pooled.pow(2).mean().sqrt().item() < 1.1


def test_learned_output_scale_multiplies_the_context():
    adapter = make_adapter()
    states, mask = random_states(), torch.ones(2, 9, dtype=torch.long)
    with torch.no_grad():
        before = adapter(states, mask).context
        adapter.context_head.scale.fill_(2.0)
        after = adapter(states, mask).context
    torch.testing.assert_close(after, 2 * before)
    assert adapter.context_head.scale.requires_grad


def test_default_size_for_a_4096_wide_llm_stays_under_60m_parameters():
    config = AdapterConfig(llm=LLMInfo("LlamaForCausalLM", "llama", 4096, 32, "tokfp1:x"), target=TARGETS["sdxl"])
    with torch.device("meta"):  # counting only: no memory, no init time
        adapter = LLMDiffAdapter(config)
    count = adapter.num_parameters()
    assert 20e6 < count < 60e6, count
    # The big pieces, by hand: projection 4096*D, 2 refiner blocks of (4 + 2r) D^2 (attention + MLP),
    # 2 resampler blocks of (8 + 2r) D^2 (self + cross attention + MLP), r the MLP ratio.
    d, r = config.arch.width, config.arch.mlp_ratio
    assert count > 4096 * d + 2 * (4 + 2 * r) * d**2 + 2 * (8 + 2 * r) * d**2


def test_wrong_layer_count_or_width_names_both_sides():
    adapter = make_adapter()
    mask = torch.ones(1, 9, dtype=torch.long)
    with pytest.raises(AdapterMismatchError, match=r"6 layer states .* width 32.*3 blocks \(4 states\) of width 32"):
        adapter(random_states(batch=1, layers=5), mask)
    with pytest.raises(AdapterMismatchError, match=r"width 48.*width 32"):
        adapter(random_states(batch=1, hidden=48), mask)


def test_malformed_inputs_are_refused_clearly():
    adapter = make_adapter()
    with pytest.raises(ValueError, match=r"\[batch, layers\+1, tokens, hidden\]"):
        adapter(torch.randn(2, 9, HIDDEN), torch.ones(2, 9))
    with pytest.raises(ValueError, match=r"attention_mask must be \[batch, tokens\] = \[2, 9\]"):
        adapter(random_states(), torch.ones(2, 8))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1] = 0
    with pytest.raises(ValueError, match=r"rows \[1\] have no real token"):
        adapter(random_states(), mask)


def test_attention_backend_choice_is_checked():
    adapter = make_adapter()
    with pytest.raises(ConfigError, match="must be one of sdpa, xformers"):
        adapter.set_attention_backend("flash")
    try:
        import xformers.ops  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match="install xformers"):
            adapter.set_attention_backend("xformers")
        assert adapter.attention_backend == "sdpa"  # a refused switch changes nothing
    else:  # xformers present: it must agree with SDPA
        states, mask = random_states(), torch.ones(2, 9, dtype=torch.long)
        mask[0, 6:] = 0
        with torch.no_grad():
            reference = adapter(states, mask).context
            adapter.set_attention_backend("xformers")
            torch.testing.assert_close(adapter(states, mask).context, reference, rtol=1e-4, atol=1e-4)


def test_masked_attention_matches_a_plain_softmax():
    """The SDPA path against attention written out by hand (one head at a time)."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, n, 3, 8, generator=g) for n in (4, 6, 6))
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    out = attention(q, k, v, mask)
    for b in range(2):
        for h in range(3):
            scores = q[b, :, h] @ k[b, :, h].T / 8**0.5
            scores = scores.masked_fill(~mask[b], float("-inf"))
            expected = torch.softmax(scores, -1) @ v[b, :, h]
            torch.testing.assert_close(out[b, :, h], expected, rtol=1e-5, atol=1e-5)


def test_start_at_gives_the_reference_statistics():
    """A fresh adapter started at a reference conditioning (a CLIP empty-prompt context: a large per-channel
    offset plus smaller per-token deviations) outputs that offset and that spread before any training."""
    g = torch.Generator().manual_seed(3)
    offset = torch.randn(2048, generator=g) * 0.9
    reference = offset + torch.randn(77, 2048, generator=g) * 0.3
    pooled = torch.randn(1280, generator=g)
    adapter = make_adapter(target="sdxl")
    before = adapter(random_states(batch=4), torch.ones(4, 9)).context
    adapter.start_at(reference, pooled)
    out = adapter(random_states(batch=4), torch.ones(4, 9))
    mean = out.context.mean(dim=(0, 1))
    assert (mean - reference.mean(dim=0)).pow(2).mean().sqrt() < 0.1  # the offset (RMS 0.9), per channel
    assert (before.mean(dim=(0, 1)) - reference.mean(dim=0)).pow(2).mean().sqrt() > 0.5  # a head left alone: far off
    spread = (out.context - mean).pow(2).mean().sqrt()
    assert 0.15 < spread < 0.45, spread  # the reference's 0.3, up to how the tokens happen to vary
    assert torch.allclose(adapter.pooled_head.proj.bias, pooled)
