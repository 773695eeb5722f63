"""ELLA / RouWei modules started from scratch (adapter/foreign/scratch.py): sizes checked against the text model and
the base, the "template" text side, and the round trip through our file format with that side recorded."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from adapter import TemplateConfig, load_llm, record_chat_template
from adapter.config import make_target
from adapter.errors import AdapterMismatchError, ConfigError
from adapter.file_format import FORMAT, load_adapter, save_adapter
from adapter.foreign import is_foreign, load_any_adapter
from adapter.foreign.scratch import EllaSizes, RouWeiSizes, fresh_config, fresh_module, to_adapter_config
from adapter.foreign.text import check_pairing, encode_text, template_side
from adapter.llm import text_decoder
from adapter.template import tokenize_prompts
from devkit.tiny_encoders import make_tiny_t5
from devkit.tiny_models import make_tiny_llm

PROMPTS = ["a red square above a blue circle", "a small green triangle"]
ELLA = EllaSizes(layers=2, heads=4, num_latents=8)
ROUWEI = RouWeiSizes(n_wide_blocks=1, n_narrow_blocks=1, num_heads=4, target_seq_len=12, max_input_len=24)


@pytest.fixture(scope="module")
def qwen():
    return load_llm(make_tiny_llm())


@pytest.fixture(scope="module")
def template(qwen):
    return record_chat_template(TemplateConfig(max_tokens=16), qwen.tokenizer)


def sd15():
    return make_target("sd15", context_dim=32)


def test_the_template_side_is_our_tokens_through_the_final_norm(qwen, template):
    states = encode_text(qwen, template_side(template), PROMPTS)
    tokens = tokenize_prompts(qwen.tokenizer, template, PROMPTS)
    with torch.no_grad():
        expected = text_decoder(qwen.model)(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).last_hidden_state
    assert torch.equal(states.mask, tokens.attention_mask)
    real = tokens.attention_mask.bool()
    torch.testing.assert_close(states.states[real], expected.float()[real])
    assert states.tokens == [i.prompt_tokens for i in tokens.infos] and states.dropped == [0, 0]


def test_a_long_prompt_is_cut_by_the_recorded_template(qwen, template):
    states = encode_text(qwen, template_side(template), ["red " * 40])
    assert states.tokens == [16] and states.dropped[0] > 0


@pytest.mark.parametrize("arch, sizes", [("ella", ELLA), ("rouwei-gemma", ROUWEI)])
def test_fresh_modules_round_trip_through_our_format(arch, sizes, qwen, template, tmp_path):
    torch.manual_seed(0)
    module = fresh_module(arch, sizes, qwen, sd15(), template).eval()
    config = module.config
    assert config.layout == "ours" and config.llm == qwen.info and config.text.encoder == "template"
    assert config.target.context_dim == 32 and config.target.pooled_dim is None
    assert config.target.num_tokens == (8 if arch == "ella" else 12)
    path = save_adapter(tmp_path / "a.safetensors", module, to_adapter_config(config, training={"steps": 1}))
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    stored = json.loads(metadata["config"])
    assert metadata["format"] == FORMAT and stored["architecture"]["kind"] == config.kind and "arch" not in stored
    assert stored["template"]["chat_template"] == template.chat_template

    loaded = load_any_adapter(path)
    assert is_foreign(loaded.config) and loaded.config == config  # the text side (template included) comes back
    assert loaded.state_dict().keys() == module.state_dict().keys()
    states = encode_text(qwen, loaded.config.text, PROMPTS)
    with torch.no_grad():
        a = module(states.states, states.mask, torch.tensor([10, 900]))
        b = loaded(states.states, states.mask, torch.tensor([10, 900]))
    assert torch.equal(a.context, b.context) and a.pooled is None and b.pooled is None
    assert a.context.shape == (2, config.target.num_tokens, 32)
    # ELLA follows the timestep, RouWei does not
    with torch.no_grad():
        c = loaded(states.states, states.mask, torch.tensor([500, 500]))
    assert torch.equal(a.context, c.context) == (arch == "rouwei-gemma")


def test_a_fresh_module_is_refused_with_another_text_model(qwen, template, tmp_path):
    """The file records the decoder it was trained with; another one of the same width, or a T5 encoder, is named."""
    module = fresh_module("ella", ELLA, qwen, sd15(), template)
    loaded = load_adapter(save_adapter(tmp_path / "e.safetensors", module, to_adapter_config(module.config)))
    check_pairing(loaded.config, qwen, "e.safetensors")
    gemma = load_llm(make_tiny_llm(family="gemma3"))
    assert gemma.info.hidden_size == qwen.info.hidden_size
    with pytest.raises(AdapterMismatchError, match="built for"):
        check_pairing(loaded.config, gemma, "e.safetensors")
    with pytest.raises(AdapterMismatchError, match="decoder LLM it was trained with"):
        check_pairing(loaded.config, load_llm(make_tiny_t5()), "e.safetensors")


def test_rouwei_for_sdxl_keeps_its_pooled_head(qwen, template):
    module = fresh_module("rouwei-gemma", ROUWEI, qwen, make_target("sdxl", context_dim=64, pooled_dim=32), template)
    states = encode_text(qwen, module.config.text, PROMPTS)
    with torch.no_grad():
        out = module(states.states, states.mask)
    assert out.context.shape == (2, 12, 64) and out.pooled.shape == (2, 32)


@pytest.mark.parametrize("arch, sizes, target, error, words", [
    ("ella", EllaSizes(heads=5), sd15(), ConfigError, "ella.heads = 5 does not divide the module's width 32"),
    ("rouwei-gemma", RouWeiSizes(num_heads=6), sd15(), ConfigError, "rouwei.num_heads = 6 does not divide"),
    ("ella", EllaSizes(layers=0), sd15(), ConfigError, "ella.layers = 0"),
    ("rouwei-gemma", RouWeiSizes(target_seq_len=0), sd15(), ConfigError, "rouwei.target_seq_len = 0"),
    ("ella", EllaSizes(time_channel=31), sd15(), ConfigError, "time_channel must be even"),
    ("ella", ELLA, make_target("sdxl", context_dim=64, pooled_dim=32), AdapterMismatchError, "no pooled vector"),
    ("perceiver", ELLA, sd15(), ConfigError, "unknown architecture 'perceiver'"),
])
def test_sizes_that_do_not_fit_are_refused(arch, sizes, target, error, words, qwen, template):
    with pytest.raises(error, match=words):
        fresh_config(arch, sizes, qwen, target, template)


def test_inspect_and_upgrade_keep_the_module_and_its_provenance(qwen, template, tmp_path, capsys):
    from adapter import __main__ as cli

    module = fresh_module("rouwei-gemma", ROUWEI, qwen, sd15(), template)
    path = save_adapter(tmp_path / "r.safetensors", module, to_adapter_config(module.config, training={"steps": 7}))
    assert cli.main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "rouwei module trained on" in out and '"steps": 7' in out and "layout ours" in out
    assert cli.main(["upgrade", str(path), "--out", str(tmp_path / "u.safetensors")]) == 0
    again = load_adapter(tmp_path / "u.safetensors")
    assert again.config == module.config and again.file_config.training == {"steps": 7}
