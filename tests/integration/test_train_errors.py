"""The trainer's error paths, each with the message a user needs: corrupt images, an empty dataset,
an adapter built for another LLM, and non-finite losses."""
import pytest

from adapter import AdapterConfig, LLMDiffAdapter, load_llm, make_target, save_adapter
from devkit.tiny_models import make_tiny_llm
from devkit.train_runs import run_train, tiny_dataset, train_command

pytestmark = pytest.mark.slow


def test_corrupt_images_are_named_and_nan_steps_are_skipped_then_stop(tmp_path):
    data = tiny_dataset(tmp_path / "data", count=4, corrupt=1)
    proc = run_train(train_command("sd15", data, tmp_path / "out", 4, "--set", "debug.inject_nan_at_step=[0, 2]",
                                   "--set", "max_nonfinite_steps=1"))
    # the corrupt image: skipped, counted, named
    assert "skipped 1 sample(s) (unreadable image: 1): broken0.png: unreadable image" in proc.output
    # step 0: non-finite, skipped, the poisoned sample (the batch's first) named; training went on
    assert "step 0: non-finite loss/gradient, step skipped (1 of at most 1)" in proc.output
    assert "samples with a non-finite loss on rank 0: ['img" in proc.output
    # step 2 crosses the threshold: a clear stop, no export
    assert proc.returncode == 1, proc.output
    assert "stopping at step 2: 2 steps had a non-finite loss or gradient (limit max_nonfinite_steps=1)" in proc.output
    assert not (tmp_path / "out/adapter.safetensors").exists()


def test_empty_dataset_says_why(tmp_path):
    data = tmp_path / "empty"
    data.mkdir()
    (data / "notes.txt").write_text("no images here")
    proc = run_train(train_command("sd15", data, tmp_path / "out", 2))
    assert proc.returncode == 1
    assert "yields no training samples: no images" in proc.output
    assert "same-named .txt captions" in proc.output  # what to fix


def test_adapter_for_another_llm_fails_before_training(tmp_path):
    # an adapter built for the tiny Llama, fine-tuned with the tiny Qwen2: named, and nothing trained
    llama = load_llm(make_tiny_llm(family="llama"))
    config = AdapterConfig(llm=llama.info, target=make_target("sd15", context_dim=32))
    config.arch.width, config.arch.heads, config.arch.refiner_layers, config.arch.resampler_layers = 32, 4, 1, 1
    save_adapter(tmp_path / "llama.safetensors", LLMDiffAdapter(config))
    data = tiny_dataset(tmp_path / "data", count=2)
    proc = run_train(train_command("sd15", data, tmp_path / "out", 2, "--init-adapter", str(tmp_path / "llama.safetensors")))
    assert proc.returncode == 1
    assert "this adapter was built for" in proc.output and "but the LLM is" in proc.output
    assert not (tmp_path / "out/checkpoints").exists() and not (tmp_path / "out/latent_cache").exists()


def test_init_adapter_for_another_base_model_is_named(tmp_path):
    qwen = load_llm(make_tiny_llm(family="qwen2"))
    config = AdapterConfig(llm=qwen.info, target=make_target("sd15", context_dim=48))
    config.arch.width, config.arch.heads, config.arch.refiner_layers, config.arch.resampler_layers = 32, 4, 1, 1
    save_adapter(tmp_path / "wide.safetensors", LLMDiffAdapter(config))
    proc = run_train(train_command("sd15", tiny_dataset(tmp_path / "data", count=2), tmp_path / "out", 2,
                                   "--init-adapter", str(tmp_path / "wide.safetensors")))
    assert proc.returncode == 1
    assert "adapter makes 48-wide" in proc.output and "the base model sd15-v1" in proc.output
