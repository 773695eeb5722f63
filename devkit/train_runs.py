"""Run the real trainer (`python -m training.train`) as a subprocess on tiny models, like diffusers' example tests.

    tiny_dataset(folder, count=6, corrupt=0) -> Path     # PNGs of a few aspect ratios + .txt captions
    train_command(kind, data, out, steps, *extra) -> list[str]   # the CLI args for a tiny run
    run_train(args, nproc=1) -> CompletedProcess          # nproc > 1 launches through torchrun
    run_in_own_group(cmd, env, timeout) -> CompletedProcess  # from devkit.processes: its process group is killed on
                                                          # timeout, and it dies with this process
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from devkit.cache import cache_dir
from devkit.processes import REPO, run_in_own_group
from devkit.tiny_models import make_tiny_llm
from devkit.tiny_pipelines import tiny_pipeline

SIZES = [(32, 32), (40, 32), (32, 48), (64, 64), (32, 32), (48, 32)]


def tiny_dataset(folder: Path, count: int = 6, corrupt: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        w, h = SIZES[i % len(SIZES)]
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"a red square, picture number {i}")
    for j in range(corrupt):
        (folder / f"broken{j}.png").write_bytes(b"this is not a png")
        (folder / f"broken{j}.txt").write_text("a broken picture")
    return folder


def train_command(kind: str, data: Path, out: Path, steps: int, *extra: str, llm_family: str = "qwen2") -> list[str]:
    """A tiny run: 32 px buckets, a 32-wide adapter, a shared latent cache per pipeline kind."""
    return [
        "--base-model", str(tiny_pipeline(kind)), "--llm", str(make_tiny_llm(family=llm_family)),
        "--data", str(data), "--output-dir", str(out), "--max-steps", str(steps), "--batch-size", "2",
        "--resolution", "32", "--seed", "0",
        "--set", "data.bucket_step=16", "--set", "arch.width=32", "--set", "arch.heads=4",
        "--set", "arch.refiner_layers=1", "--set", "arch.resampler_layers=1", "--set", "template.max_tokens=32",
        "--set", "optim.warmup_steps=1", "--set", "log_every=1",
        *extra,
    ]


def run_train(args: list[str], nproc: int = 1, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               OMP_NUM_THREADS="1" if nproc > 1 else os.environ.get("OMP_NUM_THREADS", "2"),
               LLMDIFF_CACHE=str(cache_dir()))
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               "-m", "training.train", *args]
    else:
        cmd = [sys.executable, "-m", "training.train", *args]
    return run_in_own_group(cmd, env, timeout)
