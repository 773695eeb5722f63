"""The trainer fine-tunes published adapters (ELLA, RouWei) from files in their own key layouts: a few steps on
the tiny SD1.5 / SDXL pipelines with a tiny T5 / Gemma 3, a bit-identical resume, an export in the layout the
file came in (with our provenance), and that export loaded by the layout recognition and by LLMDiffLoadAdapter.
It also starts those architectures from scratch (--arch) on a decoder LLM, and writes either kind in our own
format (--export-format ours), which records the text side the node then runs.
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from adapter import load_llm
from adapter.file_format import FORMAT
from adapter.foreign import EllaConfig, RouWeiConfig, TRAINING_METADATA_KEY, load_any_adapter, load_foreign_adapter
from devkit.comfy_pack import node_classes
from devkit.foreign_files import write_random_ella, write_random_rouwei
from devkit.tiny_encoders import make_tiny_t5
from devkit.tiny_models import make_tiny_llm
from devkit.train_runs import run_train, tiny_dataset, train_command
from training.conditioning import adapter_context, encode_for
from support.node_models import comfy_models  # noqa: F401  (fixture)

pytestmark = pytest.mark.slow

# Sized for the tiny pipelines: SD1.5's context is 32 wide; SDXL's 64 with a 32-wide pooled vector.
# The text models (tiny T5, tiny Gemma 3) give 64-wide states.
ELLA = EllaConfig(time_channel=32, time_embed_dim=32, width=32, layers=1, heads=4, num_latents=8, input_dim=64)
ROUWEI = RouWeiConfig(llm_dim=64, sdxl_seq_dim=64, sdxl_pooled_dim=32, max_input_len=48, target_seq_len=10,
                      n_wide_blocks=1, n_narrow_blocks=1, num_heads=4)

CASES = {
    # name: (pipeline, text model, writer of the original file, its layout, extra trainer flags)
    "ella": ("sd15", make_tiny_t5, lambda p: write_random_ella(p, ELLA, dtype=torch.float16), "ella-tsc", ()),
    "rouwei-fused": ("sdxl", lambda: make_tiny_llm(family="gemma3"),
                     lambda p: write_random_rouwei(p, ROUWEI, fused=True, dtype=torch.float16), "rouwei-fused", ()),
    # with a UNet LoRA trained beside the adapter (in the checkpoint, restored on resume)
    "rouwei-separate-qkv": ("sdxl", lambda: make_tiny_llm(family="gemma3"),
                            lambda p: write_random_rouwei(p, ROUWEI, fused=False), "rouwei-separate-qkv",
                            ("--set", "lora.enabled=true")),
}


def shapes_and_dtypes(path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        return {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}


def node_conditioning_matches_the_trainer(comfy_models, exported, text_model, trained, name):
    """Load `exported` with LLMDiffLoadAdapter and `text_model` with LLMDiffLoadLLM; the node's conditioning of a
    prompt and of the empty prompt (which caption dropout trains) is the trainer's encode_for + adapter_context on
    `trained` (ELLA: at the node's fixed timestep, which `timesteps=None` decodes at). Returns (handle, info)."""
    llm_dir, adapter_dir = comfy_models
    shutil.copy(exported, adapter_dir / name)
    handle, info = node_classes()["LLMDiffLoadAdapter"].execute(name).args
    (llm_dir / "text-model").symlink_to(text_model)
    llm = node_classes()["LLMDiffLoadLLM"].execute("text-model", "auto").args[0]
    library_llm = load_llm(text_model)
    for prompt in ("a red square, picture number 1", ""):
        [[context, extras]], _ = node_classes()["LLMDiffTextEncode"].execute(llm, handle, prompt).args
        with torch.no_grad():
            expected, pooled = adapter_context(trained, encode_for(trained, library_llm, None, [prompt]), None)
        torch.testing.assert_close(context, expected, rtol=1e-5, atol=1e-5)
        if pooled is not None:
            torch.testing.assert_close(extras["pooled_output"], pooled, rtol=1e-5, atol=1e-5)
    return handle, info


@pytest.mark.parametrize("name", list(CASES))
def test_fine_tune_resume_and_export_in_the_original_layout(name, tmp_path, comfy_models):  # noqa: F811
    pipeline, text_model, write, layout, flags = CASES[name]
    original = write(tmp_path / f"{name}.safetensors")
    data = tiny_dataset(tmp_path / "data", count=4)

    def command(out, *extra):
        return train_command(pipeline, data, tmp_path / out, 3, "--init-adapter", str(original),
                             "--llm", str(text_model()), "--set", f"data.latent_cache_dir={tmp_path / 'latents'}",
                             "--checkpoint-every", "1", *flags, *extra)

    # The uninterrupted run also samples a validation image at the end (the sampler's encode is encode_for too).
    whole = run_train(command("whole", "--set", 'validation.prompts=["a red square"]', "--set", "validation.steps=2"))
    assert whole.returncode == 0, whole.output
    assert sorted(p.name for p in (tmp_path / "whole/validation").rglob("*.png")) == ["00.png"]
    assert "fine-tuning" in whole.output and f"layout {layout}" in whole.output

    # Interrupted after step 1, then resumed: the export is bit-identical to the uninterrupted run's.
    part = run_train(command("split", "--set", "debug.stop_after_step=1"))
    assert part.returncode == 3, part.output
    rest = run_train(command("split", "--resume", "latest"))
    assert rest.returncode == 0, rest.output
    assert "resuming from" in rest.output
    exported = tmp_path / "whole/adapter.safetensors"
    a, b = load_file(str(exported)), load_file(str(tmp_path / "split/adapter.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    if flags:
        lora_a, lora_b = (load_file(str(tmp_path / run / "unet_lora.safetensors")) for run in ("whole", "split"))
        assert lora_a and all(torch.equal(lora_a[k], lora_b[k]) for k in lora_a)

    # Same tensor names, shapes and dtypes as the file it came from; the weights have moved (EMA of 3 steps).
    assert shapes_and_dtypes(exported) == shapes_and_dtypes(original)
    before = load_file(str(original))
    assert any(not torch.equal(before[k], a[k]) for k in a)
    with safe_open(str(exported), framework="pt") as f:
        metadata = f.metadata()
    assert "format" not in metadata  # not our own format: the published layout's readers see their file
    training = json.loads(metadata[TRAINING_METADATA_KEY])
    assert training["steps"] == 3 and training["weights"] == "ema" and training["init_adapter"] == original.name

    # The layout recognition reads it as the same architecture and sizes (head count included).
    source = load_foreign_adapter(original)
    trained = load_foreign_adapter(exported)
    assert trained.config.layout == layout and trained.config.arch == source.config.arch

    # ... and so does our loader node, with exactly the exported weights; what was trained is what is sampled.
    handle, _ = node_conditioning_matches_the_trainer(comfy_models, exported, text_model(), trained,
                                                      f"{name}-trained.safetensors")
    assert handle.module.config.layout == layout
    node_weights, file_weights = handle.module.state_dict(), trained.state_dict()
    assert node_weights.keys() == file_weights.keys()
    assert all(torch.equal(node_weights[k].float(), file_weights[k].float()) for k in file_weights)
    assert (handle.module.config.target.pooled_dim is None) == (pipeline == "sd15")

    # The trainer's conditioning hands each sample's timestep to a timestep-aware adapter (ELLA), so its
    # context differs across t in one batch; RouWei's does not depend on t.
    encoded = encode_for(trained, load_llm(text_model()), None, ["a red square"] * 2)
    with torch.no_grad():
        context, _ = adapter_context(trained, encoded, None, torch.tensor([900, 50]))
    assert (not torch.allclose(context[0], context[1])) == (name == "ella")


def test_published_adapter_with_the_wrong_text_model_is_refused(tmp_path):
    """ELLA reads a T5 encoder's states: a decoder LLM is refused before any training, naming both."""
    original = write_random_ella(tmp_path / "ella.safetensors", ELLA)
    proc = run_train(train_command("sd15", tiny_dataset(tmp_path / "data", count=2), tmp_path / "out", 1,
                                   "--init-adapter", str(original)))  # train_command's --llm is the tiny Qwen2
    assert proc.returncode == 1, proc.output
    assert "T5 encoder" in proc.output and "tiny" in proc.output.lower()
    assert not (tmp_path / "out/adapter.safetensors").exists()


def test_two_processes_fine_tune_a_published_file(tmp_path):
    """DDP over two CPU processes (torchrun) wraps the published module like ours, and rank 0 exports its layout."""
    original = write_random_rouwei(tmp_path / "rouwei.safetensors", ROUWEI, fused=True)
    proc = run_train(train_command("sdxl", tiny_dataset(tmp_path / "data", count=4), tmp_path / "out", 2,
                                   "--init-adapter", str(original), "--llm", str(make_tiny_llm(family="gemma3"))),
                     nproc=2)
    assert proc.returncode == 0, proc.output
    assert proc.output.count("adapter written:") == 1  # rank 0 only
    exported = tmp_path / "out/adapter.safetensors"
    assert shapes_and_dtypes(exported) == shapes_and_dtypes(original)
    assert load_foreign_adapter(exported).config.layout == "rouwei-fused"


def test_a_published_rouwei_file_distills_and_keeps_its_layout(tmp_path):
    """The distill stage on a RouWei file (2 x 77 tokens here, 4 x 77 published) on SDXL: its own Gemma text side,
    context and pooled vector regressed onto the base's, exported in the fused layout it came in."""
    from dataclasses import replace

    original = write_random_rouwei(tmp_path / "rouwei.safetensors", replace(ROUWEI, target_seq_len=154), fused=True)
    captions = tmp_path / "captions.txt"
    captions.write_text("a red square\na blue circle\n", encoding="utf-8")
    proc = run_train(train_command("sdxl", captions, tmp_path / "out", 2, "--preset", "distill", "--init-adapter",
                                   str(original), "--llm", str(make_tiny_llm(family="gemma3"))))
    assert proc.returncode == 0, proc.output
    exported = tmp_path / "out/adapter.safetensors"
    assert shapes_and_dtypes(exported) == shapes_and_dtypes(original)
    assert load_foreign_adapter(exported).config.layout == "rouwei-fused"
    with safe_open(str(exported), framework="pt") as f:
        training = json.loads(f.metadata()[TRAINING_METADATA_KEY])
    assert training["stage"] == "distill" and training["steps"] == 2 and training["loss"]["pooled_weight"] > 0
    # the file changed, context and pooled head alike
    before, after = load_file(str(original)), load_file(str(exported))
    assert not torch.equal(before["narrow_attention_blocks.0.mlp.0.weight"], after["narrow_attention_blocks.0.mlp.0.weight"])
    assert not torch.equal(before["pooled_projection.4.weight"], after["pooled_projection.4.weight"])


def test_llm_state_cache_is_refused_for_a_published_file(tmp_path):
    original = write_random_ella(tmp_path / "ella.safetensors", ELLA)
    proc = run_train(train_command("sd15", tiny_dataset(tmp_path / "data", count=2), tmp_path / "out", 1,
                                   "--init-adapter", str(original), "--llm", str(make_tiny_t5()),
                                   "--set", "data.cache_llm_states=true"))
    assert proc.returncode == 1, proc.output
    assert "cache_llm_states" in proc.output and "ella.safetensors" in proc.output


# Fresh modules sized for the tiny SD1.5 pipeline (context 32) and train_command's tiny Qwen2 (64-wide states).
SCRATCH = {
    "ella": ("--arch", "ella", "--set", "ella.layers=1", "--set", "ella.heads=4", "--set", "ella.num_latents=8",
             "--set", "ella.time_channel=32"),
    "rouwei-gemma": ("--arch", "rouwei-gemma", "--set", "rouwei.n_wide_blocks=1", "--set", "rouwei.n_narrow_blocks=1",
                     "--set", "rouwei.num_heads=4", "--set", "rouwei.target_seq_len=10", "--set", "rouwei.max_input_len=48"),
}


@pytest.mark.parametrize("arch", list(SCRATCH))
def test_fresh_module_trains_resumes_exports_our_format_and_runs_in_the_node(arch, tmp_path, comfy_models):  # noqa: F811
    from training.checkpoint import load_checkpoint_adapter

    data = tiny_dataset(tmp_path / "data", count=4)

    def command(out, *extra):
        return train_command("sd15", data, tmp_path / out, 3, *SCRATCH[arch], "--checkpoint-every", "1",
                             "--set", f"data.latent_cache_dir={tmp_path / 'latents'}", *extra)

    whole = run_train(command("whole"))
    assert whole.returncode == 0, whole.output
    assert f"fresh {arch}" in whole.output
    part = run_train(command("split", "--set", "debug.stop_after_step=1"))
    assert part.returncode == 3, part.output
    rest = run_train(command("split", "--resume", "latest"))
    assert rest.returncode == 0 and "resuming from" in rest.output, rest.output
    exported = tmp_path / "whole/adapter.safetensors"
    a, b = load_file(str(exported)), load_file(str(tmp_path / "split/adapter.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # Our format, recording the architecture, its sizes, the text model and the template it read.
    with safe_open(str(exported), framework="pt") as f:
        metadata = f.metadata()
    config = json.loads(metadata["config"])
    assert metadata["format"] == FORMAT and config["architecture"]["kind"] == ("ella" if arch == "ella" else "rouwei")
    assert config["architecture"]["text"]["encoder"] == "template" and config["template"]["max_tokens"] == 32
    assert config["llm"]["hidden_size"] == 64 and config["training"]["steps"] == 3
    trained = load_any_adapter(exported)
    assert trained.config.layout == "ours" and trained.config.target.context_dim == 32
    # The checkpoint's EMA weights (what bench/shapes/diagnose.py reads) are the exported ones.
    from_checkpoint = load_checkpoint_adapter(tmp_path / "whole/checkpoints/step-00000003").state_dict()
    assert from_checkpoint.keys() == a.keys() and all(torch.equal(from_checkpoint[k], a[k]) for k in a)

    _, info = node_conditioning_matches_the_trainer(comfy_models, exported, make_tiny_llm(), trained, f"{arch}.safetensors")
    assert "trained by us" in info

    # Fine-tuned again from its own file, it stays in our format with the same text side.
    again = run_train(train_command("sd15", data, tmp_path / "again", 1, "--init-adapter", str(exported),
                                    "--set", f"data.latent_cache_dir={tmp_path / 'latents'}"))
    assert again.returncode == 0, again.output
    assert load_any_adapter(tmp_path / "again/adapter.safetensors").config == trained.config


@pytest.mark.parametrize("arch", list(SCRATCH))
def test_fresh_module_over_two_processes_resumes_bit_identically(arch, tmp_path):
    """torchrun with two CPU processes trains a fresh module (ELLA: each rank's samples at their own timesteps);
    stopped after step 1 and resumed, again over two processes, it exports the same bytes as an unbroken run."""
    data = tiny_dataset(tmp_path / "data", count=4)

    def command(out, *extra):
        return train_command("sd15", data, tmp_path / out, 2, *SCRATCH[arch], "--checkpoint-every", "1", *extra)

    whole = run_train(command("whole"), nproc=2)
    assert whole.returncode == 0, whole.output
    assert whole.output.count("adapter written:") == 1  # rank 0 only
    part = run_train(command("split", "--set", "debug.stop_after_step=1"), nproc=2)
    # torchrun reports a child's exit code 3 ("preempted") as its own failure, 1
    assert part.returncode != 0 and part.output.count("exiting as if preempted") == 2, part.output
    assert (tmp_path / "split/checkpoints/step-00000001").is_dir()
    rest = run_train(command("split", "--resume", "latest"), nproc=2)
    assert rest.returncode == 0 and "resuming from" in rest.output, rest.output
    a, b = (load_file(str(tmp_path / run / "adapter.safetensors")) for run in ("whole", "split"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with safe_open(str(tmp_path / "whole/adapter.safetensors"), framework="pt") as f:
        architecture = json.loads(f.metadata()["config"])["architecture"]
    assert architecture["kind"] == ("ella" if arch == "ella" else "rouwei")


@pytest.mark.parametrize("name", ["ella", "rouwei-fused"])
def test_export_format_ours_writes_a_published_module_with_its_text_side(name, tmp_path, comfy_models):  # noqa: F811
    pipeline, text_model, write, layout, _ = CASES[name]
    original = write(tmp_path / f"{name}.safetensors")
    proc = run_train(train_command(pipeline, tiny_dataset(tmp_path / "data", count=2), tmp_path / "out", 2,
                                   "--init-adapter", str(original), "--llm", str(text_model()), "--export-format", "ours"))
    assert proc.returncode == 0, proc.output
    exported = tmp_path / "out/adapter.safetensors"
    with safe_open(str(exported), framework="pt") as f:
        metadata = f.metadata()
    architecture = json.loads(metadata["config"])["architecture"]
    assert metadata["format"] == FORMAT
    # the node's default text side, exactly as trained: T5 states padded to 128, or Gemma's chat with skip_first 27
    assert (architecture["text"]["encoder"], architecture["text"]["skip_first"]) == (
        ("t5", 0) if name == "ella" else ("gemma_chat", 27))
    trained = load_any_adapter(exported)
    assert trained.config.layout == "ours" and trained.config.arch == load_foreign_adapter(original).config.arch
    node_conditioning_matches_the_trainer(comfy_models, exported, text_model(), trained, f"{name}-ours.safetensors")


@pytest.mark.parametrize("pipeline, flags, code, words", [
    ("sd15", ("--arch", "perceiver"), 2, "--arch) must be one of ours, ella, rouwei-gemma"),
    ("sd15", ("--arch", "ella", "--set", "ella.heads=5"), 1, "ella.heads = 5 does not divide the module's width 32"),
    ("sdxl", ("--arch", "ella"), 1, "--arch ella makes no pooled vector"),
])
def test_bad_architecture_settings_are_refused(pipeline, flags, code, words, tmp_path):
    proc = run_train(train_command(pipeline, tiny_dataset(tmp_path / "data", count=2), tmp_path / "out", 1, *flags))
    assert proc.returncode == code, proc.output
    assert words in proc.output
    assert not (tmp_path / "out/adapter.safetensors").exists()
