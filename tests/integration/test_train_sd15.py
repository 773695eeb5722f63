"""The trainer on a tiny SD1.5-like pipeline: export, provenance, checkpoints, and bit-exact resume."""
import json

import pytest
import torch
from safetensors.torch import load_file

from adapter import load_adapter, read_adapter_config
from devkit.train_runs import run_train, tiny_dataset, train_command

pytestmark = pytest.mark.slow


def test_export_provenance_and_bit_exact_resume(tmp_path):
    data = tiny_dataset(tmp_path / "data")
    cache = ["--set", f"data.latent_cache_dir={tmp_path / 'latents'}", "--checkpoint-every", "2",
             "--set", "checkpoints_keep=1"]

    # Uninterrupted: 4 steps over 3 batches per epoch, so the data order crosses an epoch boundary.
    whole = run_train(train_command("sd15", data, tmp_path / "whole", 4, "--resume", "latest", *cache))
    assert whole.returncode == 0, whole.output
    assert "no checkpoint" in whole.output and "starting fresh" in whole.output  # --resume latest on a new run
    assert "resolved config:" in whole.output and "time per phase" in whole.output

    # Interrupted right after a checkpoint at step 1 (mid-epoch), then rerun with --resume latest.
    part = run_train(train_command("sd15", data, tmp_path / "split", 4, *cache, "--set", "debug.stop_after_step=1"))
    assert part.returncode == 3, part.output
    assert (tmp_path / "split/checkpoints/step-00000001/COMPLETE").is_file()
    assert not (tmp_path / "split/adapter.safetensors").exists()
    rest = run_train(train_command("sd15", data, tmp_path / "split", 4, *cache, "--resume", "latest"))
    assert rest.returncode == 0, rest.output
    assert "resuming from" in rest.output and "step-00000001" in rest.output

    a = load_file(str(tmp_path / "whole/adapter.safetensors"))
    b = load_file(str(tmp_path / "split/adapter.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs after resume"
    # the export holds the EMA weights, not the raw ones
    raw = load_file(str(tmp_path / "split/checkpoints/step-00000004/trainable.safetensors"))
    assert not torch.equal(raw["adapter.proj_in.weight"], a["proj_in.weight"])
    final_ema = load_file(str(tmp_path / "split/checkpoints/step-00000004/ema.safetensors"))
    assert torch.equal(final_ema["proj_in.weight"], a["proj_in.weight"])  # the export is the EMA

    # Rotation kept one complete checkpoint, the final one.
    assert sorted(p.name for p in (tmp_path / "whole/checkpoints").iterdir()) == ["step-00000004"]
    state = json.loads((tmp_path / "whole/checkpoints/step-00000004/state.json").read_text())
    assert state["config"]["max_steps"] == 4 and state["step"] == 4

    # The exported file is what the nodes load, with the run's provenance in its metadata.
    adapter = load_adapter(tmp_path / "whole/adapter.safetensors")
    config = read_adapter_config(tmp_path / "whole/adapter.safetensors")
    assert config.target.family == "sd15" and config.target.context_dim == 32
    training = config.training
    assert training["steps"] == 4 and training["weights"] == "ema"
    assert training["dataset"] == "data" and training["base_model"] == "sd15-v1"
    assert training["loss"]["weighting"] == "min_snr" and training["loss"]["teacher_schedule"] == "cosine"
    assert training["resolved_config"]["data"]["resolution"] == 32
    assert adapter(torch.zeros(1, 3, 5, 64), torch.ones(1, 5, dtype=torch.long)).context.shape == (1, 77, 32)

    timings = json.loads((tmp_path / "whole/timings.json").read_text())
    assert {"data", "llm", "teacher", "student", "optimizer"} <= set(timings["phases_s"])
    assert list((tmp_path / "whole/logs").glob("events.out.tfevents.*"))


    # A larger --max-steps on resume continues from the last checkpoint over the new total.
    more = run_train(train_command("sd15", data, tmp_path / "split", 5, *cache, "--resume", "latest"))
    assert more.returncode == 0, more.output
    assert "at step 4 of 5" in more.output
    assert read_adapter_config(tmp_path / "split/adapter.safetensors").training["steps"] == 5
