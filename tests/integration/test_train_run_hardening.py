"""The trainer end to end on bad inputs that used to stop it or leak into the shared file."""
import json

import pytest

from adapter.file_format import read_header
from devkit.train_runs import run_train, tiny_dataset, train_command
from training.output_lock import LOCK_NAME

pytestmark = pytest.mark.slow


def test_bad_caption_is_skipped_and_the_export_holds_names_not_paths(tmp_path):
    data = tiny_dataset(tmp_path / "data", count=6)
    (data / "img6.png").write_bytes((data / "img0.png").read_bytes())
    (data / "img6.txt").write_bytes(b"caf\xe9 au lait")  # Latin-1: stopped the whole run after model loading
    run_config = tmp_path / "my-run.toml"
    run_config.write_text(f'[data]\nlatent_cache_dir = "{tmp_path / "latents"}"\n')
    proc = run_train(train_command("sd15", data, tmp_path / "out", 2, "--preset", "uniform", "--config", str(run_config)))
    assert proc.returncode == 0, proc.output
    assert "img6.png: caption is not valid UTF-8 (byte 3" in proc.output
    # the end-of-run summary counts it by reason and names it too
    assert "skipped 1 sample(s) (caption is not valid UTF-8: 1): img6.png" in proc.output

    header = read_header(tmp_path / "out/adapter.safetensors")
    metadata = json.dumps(header["__metadata__"])
    assert str(tmp_path) not in metadata and "/tmp" not in metadata, metadata  # no local path of the trainer machine
    training = json.loads(header["__metadata__"]["config"])["training"]
    assert training["preset"] == "uniform" and training["config_file"] == "my-run.toml"
    resolved = training["resolved_config"]
    assert resolved["output_dir"] == "out" and resolved["data"]["path"] == "data"
    assert resolved["data"]["latent_cache_dir"] == "latents" and resolved["loss"]["weighting"] == "uniform"
    assert resolved["model"]["llm"] and "/" not in resolved["model"]["llm"]
    assert not (tmp_path / "out" / LOCK_NAME).exists()  # released at exit
