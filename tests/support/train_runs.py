"""Run the real trainer (`python -m training.train`) as a subprocess on tiny models, like diffusers' example tests.

    tiny_dataset(folder, count=6, corrupt=0) -> Path     # PNGs of a few aspect ratios + .txt captions
    train_command(kind, data, out, steps, *extra) -> list[str]   # the CLI args for a tiny run
    run_train(args, nproc=1) -> CompletedProcess          # nproc > 1 launches through torchrun
    run_in_own_group(cmd, env, timeout) -> CompletedProcess  # its process group is killed on timeout
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from support.cache import cache_dir
from support.tiny_models import make_tiny_llm
from support.tiny_pipelines import tiny_pipeline

REPO = Path(__file__).resolve().parents[2]
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


def kill_tree(pid: int) -> None:
    """SIGKILL the process group of `pid` and the group of every descendant: torchrun starts each worker in a
    session of its own, so killing the launcher's group alone would leave the ranks running."""
    import psutil  # a dependency of accelerate

    try:
        groups = {os.getpgid(p.pid) for p in psutil.Process(pid).children(recursive=True)}
    except (psutil.NoSuchProcess, ProcessLookupError):
        groups = set()
    for group in [pid, *groups]:  # the launcher leads its own group (start_new_session)
        try:
            os.killpg(group, signal.SIGKILL)
        except ProcessLookupError:
            pass


def run_in_own_group(cmd: list[str], env: dict, timeout: int) -> subprocess.CompletedProcess:
    """Run `cmd` in a session of its own; on timeout kill it with all its descendants (kill_tree), so no rank
    can outlive the test."""
    with subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True) as popen:
        try:
            stdout, stderr = popen.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_tree(popen.pid)
            stdout, stderr = popen.communicate()
            raise subprocess.TimeoutExpired(cmd, timeout, output=stdout, stderr=stderr) from None
        finally:
            if popen.poll() is None:  # an exception other than the timeout (e.g. KeyboardInterrupt)
                kill_tree(popen.pid)
    proc = subprocess.CompletedProcess(cmd, popen.returncode, stdout, stderr)
    proc.output = proc.stdout + proc.stderr  # one place to search for messages
    return proc
