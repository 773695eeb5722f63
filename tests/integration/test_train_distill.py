"""`--preset distill` from a captions file (no images), then the image stage from its adapter, on the tiny SD1.5 pipeline."""
import json

import pytest
import torch
from safetensors.torch import load_file

from adapter import encode_prompts, load_adapter, load_llm, read_adapter_config
from devkit.tiny_models import make_tiny_llm
from devkit.tiny_pipelines import tiny_pipeline
from devkit.train_runs import run_train, tiny_dataset, train_command
from training.models import load_base_model

pytestmark = pytest.mark.slow

CAPTIONS = ["a red square", "a blue circle on the left", "two green triangles", "a yellow star above a cat",
            "a small white house", "the sea at night"]


def _distance_to_teacher(adapter_file, prompts):
    """Mean squared distance between the adapter's context and the tiny base model's own, over `prompts`."""
    adapter = load_adapter(adapter_file)
    llm = load_llm(make_tiny_llm())
    base = load_base_model(str(tiny_pipeline("sd15")))
    with torch.no_grad():
        encoded = encode_prompts(llm, adapter.config.template, prompts)
        context = adapter(encoded.hidden_states, encoded.attention_mask).context
        teacher, _ = base.encode_clip(prompts, "cpu")
    return float((context - teacher).pow(2).mean())


def test_distill_from_captions_then_the_image_stage(tmp_path):
    captions = tmp_path / "captions.txt"
    captions.write_text("\n".join(CAPTIONS) + "\n", encoding="utf-8")
    distill_out = tmp_path / "distill"
    # Distillation reads the caption file only: there is no image anywhere near it.
    args = train_command("sd15", captions, distill_out, 30, "--preset", "distill", "--batch-size", "3",
                         "--checkpoint-every", "15", "--set", "optim.warmup_steps=2", "--set", "optim.lr=1e-2",
                         "--set", "ema_decay=0")
    first = run_train(args[: args.index("--max-steps")] + ["--max-steps", "15"] + args[args.index("--max-steps") + 2:])
    assert first.returncode == 0, first.output
    assert "teacher-context cache: computed 7 of 7 captions" in first.output  # 6 captions and the empty prompt
    done = run_train(args + ["--resume", "latest"])
    assert done.returncode == 0, done.output
    assert "resuming from" in done.output and "teacher-context cache: computed" not in done.output  # cached
    assert "student" in done.output and "teacher" in done.output  # the phase summary

    config = read_adapter_config(distill_out / "adapter.safetensors")
    assert config.training["stage"] == "distill" and config.training["steps"] == 30
    assert config.training["dataset"] == "captions" and config.training["dataset_samples"] == 6
    assert config.training["loss"]["cosine_weight"] == 0.1
    assert config.training["resolved_config"]["data"]["caption_dropout"] == 0.05

    # Distillation moved the adapter's context towards the teacher's, the empty prompt included.
    start = run_train(train_command("sd15", captions, tmp_path / "start", 1, "--preset", "distill", "--batch-size", "3",
                                    "--set", "optim.lr=1e-9", "--set", "ema_decay=0"))
    assert start.returncode == 0, start.output
    prompts = CAPTIONS[:3] + [""]
    before = _distance_to_teacher(tmp_path / "start" / "adapter.safetensors", prompts)
    after = _distance_to_teacher(distill_out / "adapter.safetensors", prompts)
    assert after < 0.5 * before, (before, after)

    # The image stage starts from the distilled adapter.
    data = tiny_dataset(tmp_path / "data")
    image = run_train(train_command("sd15", data, tmp_path / "image", 2, "--preset", "dynamic-kl",
                                    "--init-adapter", str(distill_out / "adapter.safetensors"),
                                    "--set", f"data.latent_cache_dir={tmp_path / 'latents'}"))
    assert image.returncode == 0, image.output
    final = read_adapter_config(tmp_path / "image" / "adapter.safetensors")
    assert final.training["stage"] == "image" and final.training["init_adapter"] == "adapter.safetensors"
    assert final.training["loss"]["teacher_schedule"] == "cosine"
    distilled = load_file(str(distill_out / "adapter.safetensors"))
    state = json.loads((tmp_path / "image" / "checkpoints" / "step-00000002" / "state.json").read_text())
    raw = load_file(str(tmp_path / "image" / "checkpoints" / "step-00000002" / "trainable.safetensors"))
    assert state["step"] == 2 and not torch.equal(raw["adapter.proj_in.weight"], distilled["proj_in.weight"])


def test_distill_without_captions_says_what_to_pass(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n", encoding="utf-8")
    proc = run_train(train_command("sd15", empty, tmp_path / "out", 2, "--preset", "distill"))
    assert proc.returncode == 1 and "holds no non-empty captions" in proc.output
    proc = run_train(train_command("sd15", empty, tmp_path / "out", 2, "--preset", "distill", "--concat-clip"))
    assert proc.returncode == 2 and "drop --concat-clip for distillation" in proc.output
