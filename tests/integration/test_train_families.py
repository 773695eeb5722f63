"""The trainer on tiny SDXL-like and SD2 v-prediction-like pipelines; CLIP-concat, validation images,
and a UNet LoRA that ComfyUI's own LoRA loader maps with zero unmatched keys."""
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from adapter import load_adapter, read_adapter_config
from devkit.cache import vendored_comfyui_source
from devkit.processes import run_in_own_group
from devkit.tiny_pipelines import tiny_pipeline
from devkit.train_runs import run_train, tiny_dataset, train_command

pytestmark = pytest.mark.slow


def test_sdxl_concat_clip_with_validation_images(tmp_path):
    data = tiny_dataset(tmp_path / "data")
    proc = run_train(train_command(
        "sdxl", data, tmp_path / "out", 2, "--concat-clip",
        "--set", 'validation.prompts=["a red square"]', "--set", "validation.every=2", "--set", "validation.steps=2",
    ))
    assert proc.returncode == 0, proc.output
    config = read_adapter_config(tmp_path / "out/adapter.safetensors")
    assert config.concat_clip is True
    assert (config.target.family, config.target.context_dim, config.target.pooled_dim) == ("sdxl", 64, 32)
    assert config.training["base_family"] == "sdxl"
    out = load_adapter(tmp_path / "out/adapter.safetensors")(torch.zeros(2, 3, 4, 64), torch.ones(2, 4, dtype=torch.long))
    assert out.context.shape == (2, 77, 64) and out.pooled.shape == (2, 32)
    images = sorted((tmp_path / "out/validation").rglob("*.png"))
    assert [p.relative_to(tmp_path / "out/validation").as_posix() for p in images] == ["step-00000002/00.png"]


def test_v_prediction_with_unet_lora_loads_in_comfyui(tmp_path):
    data = tiny_dataset(tmp_path / "data")
    proc = run_train(train_command(
        "sd2v", data, tmp_path / "out", 2, "--set", "lora.enabled=true", "--set", "lora.rank=4",
        "--set", "lora.alpha=2.0", "--set", "loss.teacher_schedule=constant",
    ))
    assert proc.returncode == 0, proc.output
    config = read_adapter_config(tmp_path / "out/adapter.safetensors")
    assert config.target.family == "sd2" and config.training["prediction_type"] == "v_prediction"
    assert config.training["unet_lora"] == "unet_lora.safetensors"
    lora_file = tmp_path / "out/unet_lora.safetensors"

    report = run_in_own_group(
        [sys.executable, str(Path(__file__).with_name("comfy_lora_check.py")), str(vendored_comfyui_source()),
         str(tiny_pipeline("sd2v") / "unet"), str(lora_file)], dict(os.environ), timeout=240)
    assert report.returncode == 0, report.stdout + report.stderr
    result = json.loads(report.stdout.strip().splitlines()[-1])
    assert result["missing"] == [] and result["unexpected"] == []  # ComfyUI's UNet has this exact structure
    assert result["not_loaded"] == []  # zero unmatched LoRA keys
    assert result["patched"] * 3 == result["lora_tensors"]  # every module (up, down, alpha) became one patch

    # ComfyUI's merge equals peft's for the same module: scale alpha / rank = 0.5, B @ A
    trained = load_file(str(tmp_path / "out/checkpoints/step-00000002/trainable.safetensors"))
    module = result["diffusers_module"]
    a, b = trained[f"unet.{module}.lora_A.default.weight"], trained[f"unet.{module}.lora_B.default.weight"]
    expected = (0.5 * (b @ a)).reshape(-1)[:8]
    assert torch.allclose(torch.tensor(result["delta"]), expected, atol=1e-6)
    assert expected.abs().sum() > 0  # the LoRA trained away from its zero-initialised B
