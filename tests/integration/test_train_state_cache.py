"""The opt-in LLM-state cache (data.cache_llm_states): same training as the online LLM, entries on disk keyed
by what they depend on, and a clear refusal when the cache would not fit its budget."""
import pytest
import torch
from safetensors.torch import load_file

from adapter import TemplateConfig, encode_prompts, load_llm
from devkit.tiny_models import make_tiny_llm
from devkit.train_runs import run_train, tiny_dataset, train_command
from training.config import TrainConfigError
from training.state_cache import StateCache

pytestmark = pytest.mark.slow


def test_cached_llm_states_train_exactly_like_online_ones(tmp_path):
    data = tiny_dataset(tmp_path / "data")
    # caption_dropout 0.5 so that the cached empty prompt is used within 3 steps of batch 2
    common = ["--set", f"data.latent_cache_dir={tmp_path / 'latents'}", "--set", "data.caption_dropout=0.5"]
    online = run_train(train_command("sd15", data, tmp_path / "online", 3, *common))
    assert online.returncode == 0, online.output
    cached = run_train(train_command("sd15", data, tmp_path / "cached", 3, *common, "--set", "data.cache_llm_states=true"))
    assert cached.returncode == 0, cached.output
    assert "LLM-state cache" in cached.output

    # one entry per distinct caption plus the empty prompt, each [L+1, T, H] of real tokens only
    entries = sorted((tmp_path / "cached/llm_state_cache").rglob("*.safetensors"))
    assert len(entries) == 6 + 1
    lengths = set()
    for entry in entries:
        states = load_file(str(entry))["states"]
        assert states.dim() == 3 and states.dtype == torch.float32 and torch.isfinite(states).all()
        lengths.add(states.shape[1])
    assert len(lengths) > 1  # the empty prompt is shorter: entries are not padded to a common length
    assert not (tmp_path / "online/llm_state_cache").exists()  # online is the default

    a = load_file(str(tmp_path / "online/adapter.safetensors"))
    b = load_file(str(tmp_path / "cached/adapter.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        # bit-identical on CPU/fp32: cached states are the online ones, and padding is zeroed by the adapter
        assert torch.equal(b[key], a[key]), f"{key} differs with the LLM-state cache"


def test_entries_are_keyed_by_weights_template_and_caption_and_read_back_exactly(tmp_path):
    llm = load_llm(make_tiny_llm(family="qwen2"))
    template = TemplateConfig()
    cache = StateCache(tmp_path / "states", llm, template)
    key = cache.key("a cat")
    assert key != cache.key("a dog")
    assert StateCache(tmp_path / "states", llm, TemplateConfig(instruction="Draw: ")).key("a cat") != key
    with torch.no_grad():
        next(llm.model.parameters()).view(-1)[0] += 1e-3  # a fine-tuned LLM must not read the old states
    assert StateCache(tmp_path / "states", llm, template).key("a cat") != key
    with torch.no_grad():
        next(llm.model.parameters()).view(-1)[0] -= 1e-3

    prompts = ["a cat on a long red sofa", ""]
    cache.fill(prompts, batch_size=2)
    assert len(list((tmp_path / "states").rglob("*.safetensors"))) == 2 and cache.computed == 2
    cache.fill(prompts, batch_size=2)
    assert cache.computed == 2  # a second fill (or a later run) reuses the entries
    cached, online = cache.encode(prompts), encode_prompts(llm, template, prompts)
    assert torch.equal(cached.attention_mask, online.attention_mask)
    real = online.attention_mask.bool()[:, None, :, None].expand_as(online.hidden_states)
    assert torch.equal(cached.hidden_states[real], online.hidden_states[real])
    assert not cached.hidden_states[~real].any()  # padding is zeros (the adapter zeroes it anyway)


def test_a_cache_over_budget_is_refused_with_the_numbers(tmp_path):
    llm = load_llm(make_tiny_llm(family="qwen2"))
    cache = StateCache(tmp_path / "states", llm, TemplateConfig())
    assert cache.check_budget(["a cat", "a dog", ""], max_gb=1.0) > 0
    with pytest.raises(TrainConfigError) as err:
        cache.check_budget(["a cat", "a dog", ""], max_gb=1e-9)
    message = str(err.value)
    assert "data.llm_cache_max_gb=1e-09" in message and "3 distinct captions" in message
    assert "data.cache_llm_states=false" in message
    assert not list((tmp_path / "states").rglob("*.safetensors"))  # refused before computing anything
