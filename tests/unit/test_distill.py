"""Teacher-context distillation: the loss on known tensors, caption-only sources, the teacher's contexts (the
empty prompt included) and the per-channel start of a fresh adapter."""
import json

import pytest
import torch
from PIL import Image

from adapter import AdapterConfig, LLMDiffAdapter, LLMInfo, make_target
from training.data import DatasetError
from training.distill import TeacherContexts, read_captions
from training.losses import distillation_loss


# ---------------------------------------------------------------------------------------------
# the loss


def test_distillation_loss_is_zero_at_the_teacher():
    teacher = torch.randn(2, 77, 8)
    loss, mse, cos_gap = distillation_loss(teacher.clone(), teacher)
    assert float(loss) == pytest.approx(0.0, abs=1e-6) and float(mse) == 0.0 and float(cos_gap) == pytest.approx(0.0, abs=1e-6)


def test_distillation_loss_on_hand_computed_slots():
    # slot 0: same direction, twice the size -> squared error (1, 0) -> mean 0.5, cosine 1 (gap 0)
    # slot 1: orthogonal, same size -> squared error (1, 1) -> mean 1, cosine 0 (gap 1)
    teacher = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])
    student = torch.tensor([[[2.0, 0.0], [0.0, 1.0]]])
    loss, mse, cos_gap = distillation_loss(student, teacher, cosine_weight=0.1)
    assert float(mse) == pytest.approx((0.5 + 1.0) / 2)
    assert float(cos_gap) == pytest.approx((0.0 + 1.0) / 2)
    assert float(loss) == pytest.approx(0.75 + 0.1 * 0.5)


def test_distillation_loss_counts_every_slot_padding_included():
    teacher = torch.zeros(1, 77, 4)
    student = teacher.clone()
    student[0, 76] = 1.0  # only the last (padding) slot is wrong
    _, mse, _ = distillation_loss(student, teacher, cosine_weight=0.0)
    assert float(mse) == pytest.approx(4 / (77 * 4))


def test_distillation_loss_gradient_points_at_the_teacher():
    teacher = torch.randn(3, 5, 6)
    student = torch.zeros_like(teacher, requires_grad=True)
    distillation_loss(student, teacher, cosine_weight=0.0)[0].backward()
    assert torch.allclose(student.grad, -2 * teacher / teacher.numel())


def test_distillation_loss_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match="same shape"):
        distillation_loss(torch.zeros(1, 77, 8), torch.zeros(1, 77, 16))
    with pytest.raises(ValueError, match="cosine_weight"):
        distillation_loss(torch.zeros(1, 2), torch.zeros(1, 2), cosine_weight=-1)


# ---------------------------------------------------------------------------------------------
# captions only


def test_captions_from_a_txt_file_keep_repeats_and_drop_blanks(tmp_path):
    path = tmp_path / "captions.txt"
    path.write_text("a red circle\n\n  a blue square  \na red circle\n", encoding="utf-8")
    captions = read_captions(str(path))  # a frequent caption stays frequent, as in the image stage
    assert captions.samples == ["a red circle", "a blue square", "a red circle"] and captions.name == "captions"


def test_captions_from_a_jsonl_file_and_its_caption_column(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"prompt": "two cats"}) + "\n" + json.dumps({"prompt": "a dog"}) + "\n", encoding="utf-8")
    assert read_captions(str(path), caption_column="prompt").samples == ["two cats", "a dog"]
    with pytest.raises(DatasetError, match=r"line 1: expected a JSON object with a 'text' key"):
        read_captions(str(path))


def test_captions_from_image_datasets_without_reading_images(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(2):
        (folder / f"{i}.png").write_bytes(b"not even an image: distillation never opens it")
        (folder / f"{i}.txt").write_text(f"caption {i}", encoding="utf-8")
    assert read_captions(str(folder)).samples == ["caption 0", "caption 1"]
    meta = tmp_path / "meta"
    meta.mkdir()
    Image.new("RGB", (8, 8)).save(meta / "a.png")
    (meta / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "caption": "a grey square"}) + "\n")
    assert read_captions(str(meta), caption_column="caption").samples == ["a grey square"]


def test_caption_sources_that_give_nothing_say_so(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        read_captions(str(tmp_path / "missing.txt"))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n", encoding="utf-8")
    with pytest.raises(DatasetError, match="no non-empty captions"):
        read_captions(str(empty))
    with pytest.raises(DatasetError, match="no captions given"):
        read_captions("")


# ---------------------------------------------------------------------------------------------
# the teacher's contexts and the empty prompt


@pytest.fixture(scope="module")
def tiny_sd15():
    from devkit.tiny_pipelines import tiny_pipeline
    from training.models import load_base_model

    return load_base_model(str(tiny_pipeline("sd15")))


def test_teacher_contexts_are_the_base_models_own_and_the_empty_prompt_maps_to_its_empty_context(tiny_sd15, tmp_path):
    prompts = ["a red circle", "", "a blue square"]
    want, _ = tiny_sd15.encode_clip(prompts, "cpu")
    cached = TeacherContexts(tiny_sd15, "cpu", tmp_path / "cache")
    cached.fill(sorted(set(prompts)), batch_size=2)
    context, pooled = cached.get(prompts)
    assert pooled is None and torch.equal(context, want.float())
    empty, _ = tiny_sd15.encode_clip([""], "cpu")
    assert torch.equal(context[1], empty[0].float())  # what classifier-free guidance subtracts
    online, _ = TeacherContexts(tiny_sd15, "cpu").get(prompts)  # no cache: the same numbers
    assert torch.equal(online, want.float())
    # a second process (same weights) finds every entry; other weights never hit them
    assert TeacherContexts(tiny_sd15, "cpu", tmp_path / "cache").key("") == cached.key("")
    weight = next(tiny_sd15.text_encoders[0].parameters())
    with torch.no_grad():
        weight.add_(1.0)
    try:
        assert TeacherContexts(tiny_sd15, "cpu", tmp_path / "cache").key("") != cached.key("")
    finally:
        with torch.no_grad():
            weight.sub_(1.0)


# ---------------------------------------------------------------------------------------------
# a fresh adapter starts at the teacher's per-channel statistics


def _adapter(context_dim: int = 16) -> LLMDiffAdapter:
    info = LLMInfo(name="t", architecture="Qwen2ForCausalLM", model_type="qwen2", hidden_size=24, num_layers=2,
                   tokenizer_fingerprint="x")
    config = AdapterConfig(llm=info, target=make_target("sd15", context_dim=context_dim))
    config.arch.width, config.arch.heads, config.arch.refiner_layers, config.arch.resampler_layers = 32, 4, 1, 1
    return LLMDiffAdapter(config).eval()


def test_start_at_per_channel_gives_every_channel_the_teachers_mean_and_spread():
    torch.manual_seed(0)
    mean = torch.linspace(-2, 2, 16)
    std = torch.linspace(0.1, 1.5, 16)
    teacher = mean + std * torch.randn(64, 77, 16)
    adapter = _adapter()
    adapter.start_at(teacher, per_channel=True)
    head = adapter.context_head
    assert torch.allclose(head.proj.bias, teacher.reshape(-1, 16).mean(0))
    spread = (teacher.reshape(-1, 16) - teacher.reshape(-1, 16).mean(0)).pow(2).mean(0).sqrt()
    assert torch.allclose(head.proj.weight.norm(dim=1), spread, rtol=1e-5)
    # and the output, on unit-RMS features (what the head's LayerNorm gives), has those statistics
    features = torch.nn.functional.layer_norm(torch.randn(20000, 32), (32,))
    out = head.proj(features) * head.scale
    assert torch.allclose(out.mean(0), mean, atol=0.05)
    assert torch.allclose(out.std(0), std, rtol=0.1, atol=0.02)


def test_start_at_without_per_channel_keeps_one_spread_for_all_channels():
    teacher = torch.randn(10, 77, 16) * torch.linspace(0.1, 1.5, 16)
    adapter = _adapter()
    adapter.start_at(teacher)
    norms = adapter.context_head.proj.weight.norm(dim=1)
    assert norms.std() / norms.mean() < 0.5  # random rows of one common scale, not the teacher's per-channel spread
    assert float(norms.pow(2).mean().sqrt()) == pytest.approx(float((teacher - teacher.reshape(-1, 16).mean(0)).pow(2).mean().sqrt()), rel=1e-5)


# ---------------------------------------------------------------------------------------------
# the per-token output mode


def test_per_token_mode_keeps_the_token_layout_with_the_same_weights(tmp_path):
    from adapter import AdapterConfig as Config, load_adapter, save_adapter

    resampler = _adapter()
    config = Config.from_dict({**resampler.config.to_dict(), "arch": {**resampler.config.to_dict()["arch"], "output": "per_token"}})
    per_token = LLMDiffAdapter(config).eval()
    per_token.load_state_dict(resampler.state_dict())  # the same weights: the mode only changes how slots start
    torch.manual_seed(1)
    states = torch.randn(2, 3, 6, 24)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    with torch.no_grad():
        a, b = resampler(states, mask).context, per_token(states, mask).context
        assert not torch.allclose(a, b)
        # padding adds nothing to the layout: the short prompt alone gives the same context
        alone = per_token(states[1:, :, :3], mask[1:, :3]).context
        assert torch.allclose(alone, b[1:], atol=1e-5)
        # the prompt's first token shapes slot 0 more than a padding slot far away
        moved = states.clone()
        moved[0, :, 0] += 3.0
        delta = (per_token(moved, mask).context - b).pow(2).mean(-1)[0]
        assert delta[0] > delta[70]
    path = save_adapter(tmp_path / "per_token.safetensors", per_token)
    assert load_adapter(path).config.arch.output == "per_token"


def test_adapter_files_without_an_output_mode_load_as_the_resampler():
    from pathlib import Path

    from safetensors import safe_open

    from adapter import load_adapter

    old = Path(__file__).parent / "data" / "static_adapter_v1.safetensors"
    with safe_open(str(old), framework="pt") as handle:
        assert "output" not in json.loads(handle.metadata()["config"])["arch"]  # written before the mode existed
    adapter = load_adapter(old)
    assert adapter.config.arch.output == "resampler"


# ---------------------------------------------------------------------------------------------
# the preset


def test_distill_preset_and_stage_checks():
    from adapter.errors import ConfigError
    from training.config import TrainConfigError, resolve_config

    cfg, _ = resolve_config(["--preset", "distill"])
    assert cfg.stage == "distill" and cfg.batch_size == 64 and cfg.optim.lr == 2e-3
    assert cfg.data.caption_dropout == 0.05 and cfg.distill.cosine_weight == 0.1
    assert resolve_config([])[0].stage == "image"  # the default recipe is unchanged
    with pytest.raises(TrainConfigError, match="stage must be one of image, distill"):
        resolve_config(["--set", "stage=text"])
    with pytest.raises(TrainConfigError, match="unknown config key 'distill.cosine'"):
        resolve_config(["--preset", "distill", "--set", "distill.cosine=0.2"])
    with pytest.raises(ConfigError, match="arch.output must be one of resampler, per_token"):
        resolve_config(["--set", "arch.output=tokens"])
