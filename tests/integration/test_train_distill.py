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


def _rouwei_distance(adapter_file, prompts, pipeline="sd15"):
    """Mean squared distance between a RouWei module's context and k copies of the base's own (training.distill's
    target), through the module's own text side."""
    from adapter.foreign import load_any_adapter
    from training.conditioning import encode_for

    adapter = load_any_adapter(adapter_file)
    llm = load_llm(make_tiny_llm())
    base = load_base_model(str(tiny_pipeline(pipeline)))
    with torch.no_grad():
        encoded = encode_for(adapter, llm, getattr(adapter.config, "template", None), prompts)
        context = adapter(encoded.hidden_states, encoded.attention_mask).context
        teacher, _ = base.encode_clip(prompts, "cpu")
    assert context.shape[1] == 2 * teacher.shape[1]
    return float((context - teacher.repeat(1, 2, 1)).pow(2).mean())


ROUWEI_2X77 = ("--arch", "rouwei-gemma", "--set", "rouwei.n_wide_blocks=1", "--set", "rouwei.n_narrow_blocks=1",
               "--set", "rouwei.num_heads=4", "--set", "rouwei.target_seq_len=154", "--set", "rouwei.max_input_len=48")


def test_a_rouwei_module_distills_onto_copies_of_the_teacher_context(tmp_path):
    """308 = 4 x 77 in the published files, 154 = 2 x 77 here: each 77-token chunk regresses onto the teacher's context
    (the same attention for the UNet), through RouWei's own text side; the export is the fresh module, our format."""
    captions = tmp_path / "captions.txt"
    captions.write_text("\n".join(CAPTIONS) + "\n", encoding="utf-8")

    def distill(out, steps, lr):
        return run_train(train_command("sd15", captions, tmp_path / out, steps, "--preset", "distill", *ROUWEI_2X77,
                                       "--batch-size", "3", "--set", f"optim.lr={lr}", "--set", "optim.warmup_steps=2",
                                       "--set", "ema_decay=0"))

    start, done = distill("start", 1, 1e-9), distill("distill", 30, 3e-3)
    assert start.returncode == 0 and done.returncode == 0, start.output + done.output
    assert "fresh rouwei-gemma" in done.output and "teacher-context cache: computed 7 of 7 captions" in done.output
    prompts = CAPTIONS[:3] + [""]
    before = _rouwei_distance(tmp_path / "start/adapter.safetensors", prompts)
    after = _rouwei_distance(tmp_path / "distill/adapter.safetensors", prompts)
    assert after < 0.5 * before, (before, after)
    assert read_adapter_config(tmp_path / "distill/adapter.safetensors").training["stage"] == "distill"


@pytest.mark.parametrize("flags, tokens", [
    (("--arch", "ella", "--set", "ella.layers=1", "--set", "ella.heads=4", "--set", "ella.num_latents=8",
      "--set", "ella.time_channel=32"), 8),
    (("--arch", "rouwei-gemma", "--set", "rouwei.n_wide_blocks=1", "--set", "rouwei.n_narrow_blocks=1",
      "--set", "rouwei.num_heads=4", "--set", "rouwei.target_seq_len=100", "--set", "rouwei.max_input_len=48"), 100),
])
def test_a_module_whose_tokens_are_no_multiple_of_the_teachers_is_refused_before_any_work(flags, tokens, tmp_path):
    captions = tmp_path / "captions.txt"
    captions.write_text("\n".join(CAPTIONS) + "\n", encoding="utf-8")
    proc = run_train(train_command("sd15", captions, tmp_path / "out", 2, "--preset", "distill", *flags))
    assert proc.returncode == 1, proc.output
    assert f"{tokens} output tokens" in proc.output and "77-token" in proc.output and "--preset dynamic-kl" in proc.output
    assert "teacher-context cache" not in proc.output and not (tmp_path / "out/adapter.safetensors").exists()
