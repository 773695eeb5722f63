"""adapter/timestep_contexts.py: per-step contexts of many conditioning entries, batched into one decode and
cached per (timestep, entry), checked against a reference that runs the whole adapter on each entry alone."""
import pytest
import torch

from adapter.model import FALLBACK_TIMESTEP
from adapter.timestep_contexts import LENGTH_MULTIPLE, StepContexts, StepStates, fit_length, state_length
from support.adapters import HIDDEN, LAYERS, make_adapter, trained_like

ATOL = 1e-5  # batched vs alone: the same math, summed in another order


def prompt(length: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(-1, 2, LAYERS + 1).view(1, -1, 1, 1)
    return torch.randn(1, LAYERS + 1, length, HIDDEN, generator=g) * scales, torch.ones(1, length, dtype=torch.long)


@pytest.fixture(scope="module")
def adapter():
    return trained_like(make_adapter(True))


def entry(adapter, states, mask, length=24, strength=1.0, tail=0):
    """A StepStates as LLMDiffTextEncode makes it: the context it wrote is the adapter at the fallback t."""
    with torch.no_grad():
        encoded = adapter.encode_states(states, mask)
        context = adapter.decode(encoded, mask).context * strength
    if tail:
        context = torch.cat([context, torch.full((1, tail, context.shape[2]), 0.25)], dim=1)
    return StepStates.build(encoded, mask, length, strength=strength, context=context, num_tokens=adapter.config.target.num_tokens,
                            adapter_id="id", adapter_name="test")


def reference(adapter, states, mask, t, strength=1.0):
    """The whole adapter on this one prompt at timestep t: what the context must be."""
    with torch.no_grad():
        return adapter(states, mask, t).context * strength


def test_state_length_is_the_template_plus_the_budget_rounded_up():
    assert state_length(17, 256) == 280 and state_length(8, 256) == 264
    assert state_length(1, 1) == LENGTH_MULTIPLE
    with pytest.raises(ValueError):
        state_length(0, 256)


def test_fit_length_pads_with_masked_zeros_and_cuts_only_padding(adapter):
    states, mask = prompt(5, 0)
    with torch.no_grad():
        encoded = adapter.encode_states(states, mask)
    padded, padded_mask = fit_length(encoded, mask, 16)
    assert padded_mask.tolist() == [[1] * 5 + [0] * 11]
    assert all(k.shape[1] == 16 and not k[:, 5:].any() for kv in padded.cross_kv for k in kv)
    back, back_mask = fit_length(padded, padded_mask, 5)
    assert torch.equal(back_mask, mask) and all(torch.equal(a, b) for x, y in zip(back.cross_kv, encoded.cross_kv) for a, b in zip(x, y))


def test_an_entry_over_the_fixed_length_keeps_every_token(adapter):
    states, mask = prompt(30, 1)
    e = entry(adapter, states, mask, length=24)
    assert e.tokens == 30 and e.mask.shape[1] == 32  # rounded up, so nothing is cut
    step = StepContexts(adapter)
    step.prepare([e], [700.0])
    torch.testing.assert_close(step.context(e, e.context, [700.0]), reference(adapter, states, mask, 700.0), atol=ATOL, rtol=0)


def test_batched_entries_of_mixed_lengths_match_each_entry_alone(adapter):
    prompts = [prompt(n, seed) for seed, n in enumerate((3, 9, 14))]
    strengths = (1.0, 0.5, 2.0)
    entries = [entry(adapter, s, m, strength=k, tail=77 if i == 1 else 0) for i, ((s, m), k) in enumerate(zip(prompts, strengths))]
    step = StepContexts(adapter)
    step.prepare(entries, [981.0])
    assert step.decoded == 3  # one decode call for all of them
    for (states, mask), e, k in zip(prompts, entries, strengths):
        got = step.context(e, e.context, [981.0])
        assert got.shape == e.context.shape  # CLIP's tail kept: the entry still batches as before
        torch.testing.assert_close(got[:, :e.num_tokens], reference(adapter, states, mask, 981.0, k), atol=ATOL, rtol=0)
        assert torch.equal(got[:, e.num_tokens:], e.context[:, e.num_tokens:])


def test_one_entry_alone_is_exactly_the_adapter(adapter):
    """The padding is trimmed before decoding: a single entry attends unmasked, exactly as when encoded."""
    states, mask = prompt(7, 3)
    e = entry(adapter, states, mask)
    for t in (0.0, 412.5, 999.0):
        step = StepContexts(adapter)
        step.prepare([e], [t])
        assert torch.equal(step.context(e, e.context, [t]), reference(adapter, states, mask, t))


def test_per_sample_timesteps_give_one_row_per_sample(adapter):
    states, mask = prompt(6, 4)
    e = entry(adapter, states, mask)
    step = StepContexts(adapter)
    timesteps = [100.0, 900.0, 100.0]
    step.prepare([e], timesteps)
    assert step.decoded == 2  # 100 is decoded once
    got = step.context(e, e.context, timesteps)
    assert got.shape[0] == 3
    for row, t in zip(got, timesteps):
        torch.testing.assert_close(row[None], reference(adapter, states, mask, t), atol=ATOL, rtol=0)


def test_cache_per_timestep_and_entry(adapter):
    a, b = entry(adapter, *prompt(4, 5)), entry(adapter, *prompt(8, 6))
    step = StepContexts(adapter)
    step.prepare([a, b, a, a], [500.0, 500.0])  # one entry shared by several conditioning entries
    assert step.decoded == 2
    first = step.context(a, a.context, [500.0])
    step.prepare([b, a], [500.0])  # already there: nothing new runs
    assert step.decoded == 2
    step.prepare([a], [20.0])  # a new timestep for one entry
    assert step.decoded == 3
    assert torch.equal(step.context(a, a.context, [500.0]), first)
    assert not torch.allclose(step.context(a, a.context, [20.0]), first)


def test_context_changes_with_the_timestep_and_equals_the_fallback_at_500(adapter):
    states, mask = prompt(5, 7)
    e = entry(adapter, states, mask)
    step = StepContexts(adapter)
    step.prepare([e], [FALLBACK_TIMESTEP, 50.0])
    torch.testing.assert_close(step.context(e, e.context, [FALLBACK_TIMESTEP]), e.context, atol=ATOL, rtol=0)
    assert (step.context(e, e.context, [50.0]) - e.context).abs().max() > 1e-3


def test_untouched_recognises_copies_and_appended_tokens_only(adapter):
    e = entry(adapter, *prompt(5, 8))
    assert e.is_untouched(e.context)  # SetArea, SetTimestepRange, ControlNet apply: the same tensor
    assert e.is_untouched(torch.cat([e.context.clone(), torch.zeros(1, 77, e.context.shape[2])], dim=1))  # Concat
    assert not e.is_untouched(e.context * 0.5 + 0.1)  # Average
    assert not e.is_untouched(torch.zeros_like(e.context))  # ZeroOut
    assert not e.is_untouched(e.context.repeat(2, 1, 1))  # not the entry's batch of one
