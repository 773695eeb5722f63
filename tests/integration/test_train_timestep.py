"""The trainer with the timestep-aware adapter: `--preset timestep-aware` trains the adaLN
modulation and exports a timestep-aware file; validation samples with the context recomputed per step."""
import pytest
import torch

from adapter import load_adapter, read_adapter_config
from devkit.train_runs import run_train, tiny_dataset, train_command

pytestmark = pytest.mark.slow


def test_timestep_aware_preset_trains_and_exports(tmp_path):
    data = tiny_dataset(tmp_path / "data", count=4)
    proc = run_train(train_command(
        "sd15", data, tmp_path / "out", 2, "--preset", "timestep-aware", "--set", "ema_decay=0",
        "--set", f"data.latent_cache_dir={tmp_path / 'latents'}",
        "--set", 'validation.prompts=["a red square"]', "--set", "validation.steps=2"))
    assert proc.returncode == 0, proc.output

    path = tmp_path / "out/adapter.safetensors"
    assert read_adapter_config(path).arch.timestep_aware is True
    adapter = load_adapter(path)
    # The modulation starts at exactly zero; after two steps it must have learned something.
    assert adapter.resampler[-1].modulation[1].weight.abs().max() > 0
    states, mask = torch.randn(1, 3, 5, 64), torch.ones(1, 5, dtype=torch.long)
    with torch.no_grad():
        early, late = adapter(states, mask, 950), adapter(states, mask, 50)
    assert not torch.equal(early.context, late.context)  # the trained adapter's context depends on t
    assert sorted(p.name for p in (tmp_path / "out/validation").rglob("*.png")) == ["00.png"]
