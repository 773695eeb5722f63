"""Two trainer processes on a CPU through torchrun (gloo): sharded latent caching, one set of
checkpoints, one export, and a clean distributed teardown (training/distributed.py). On a timeout,
run_train kills torchrun and every rank (each runs in a session of its own), so none outlives the test."""
import pytest

from adapter import load_adapter
from devkit.train_runs import run_train, tiny_dataset, train_command

pytestmark = pytest.mark.slow


def test_torchrun_two_processes(tmp_path):
    data = tiny_dataset(tmp_path / "data", count=6)
    proc = run_train(train_command("sd15", data, tmp_path / "out", 2, "--checkpoint-every", "1"), nproc=2)
    assert proc.returncode == 0, proc.output
    # the pre-step cached latents without communication: each of the 2 ranks encoded its half
    assert "latent cache: encoded 3 of 3 images" in proc.output
    assert "of 6 images" not in proc.output  # rank 0's pass over all 6 found rank 1's half already on disk
    assert "terminate called" not in proc.output
    assert proc.output.count("adapter written:") == 1  # only the main process exports
    checkpoints = sorted(p.name for p in (tmp_path / "out/checkpoints").iterdir())
    assert checkpoints == ["step-00000001", "step-00000002"]  # written once each, no stray temp folders
    assert load_adapter(tmp_path / "out/adapter.safetensors").config.training["steps"] == 2
