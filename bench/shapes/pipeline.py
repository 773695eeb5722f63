"""The shapes benchmark's moving parts between assets and numbers: the training images, an adapter trained
with the trainer's real command line, and the adapters a run left behind (final file and checkpoints).

    data = ensure_train_data(cache / "train-8000")
    run = train_adapter(assets, data, out / "dynamic-kl-s0", preset="dynamic-kl", seed=0)
    adapter = load_checkpoint_adapter(run / "checkpoints" / "step-00000100")   # its EMA weights

The trainer runs as a subprocess (`python -m training.train --preset <arm> --config bench/shapes/adapter.toml
...`), exactly as a user runs it: nothing here re-implements its loop.
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

from .assets import BASE_FOLDER, LM_FOLDER

__all__ = ["SHAPES_CONFIG", "ensure_captions", "ensure_train_data", "load_checkpoint_adapter", "train_adapter", "train_command"]

logger = logging.getLogger(__name__)

SHAPES_CONFIG = Path(__file__).with_name("adapter.toml")
TRAIN_IMAGES = 8000  # the scenes the tiny base was trained on (BaseConfig.train_images, same seed)
DONE = ".complete"


def ensure_train_data(folder: str | Path, n: int = TRAIN_IMAGES, seed: int = 0) -> Path:
    """An image folder of n train-split scenes with .txt captions (the trainer's format); written once."""
    from .scenes import generate, write_image_folder

    folder = Path(folder)
    if (folder / DONE).is_file():
        return folder
    logger.info("writing %d training scenes to %s", n, folder)
    write_image_folder(folder, generate("train", n, seed))
    (folder / DONE).write_text(f"{n} train scenes, seed {seed}\n", encoding="utf-8")
    return folder


def ensure_captions(path: str | Path, n: int = TRAIN_IMAGES, seed: int = 0) -> Path:
    """The captions of the n train-split scenes ensure_train_data draws, one per line: all the distill stage
    reads (no images are written)."""
    from .scenes import generate

    path = Path(path)
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(f"{s.caption}\n" for s in generate("train", n, seed)), encoding="utf-8")
        os.replace(tmp, path)
    return path


def train_command(assets: Path, data: Path, out: Path, preset: str, seed: int, max_steps: Optional[int] = None,
                  extra: tuple[str, ...] = ()) -> list[str]:
    """The trainer's command line for one arm of the benchmark. The VAE latents are cached beside the data
    (keys are content hashes plus the VAE's fingerprint), so every arm and seed encodes the images once."""
    cmd = [sys.executable, "-m", "training.train", "--preset", preset, "--config", str(SHAPES_CONFIG),
           "--base-model", str(Path(assets) / BASE_FOLDER), "--llm", str(Path(assets) / LM_FOLDER),
           "--data", str(data), "--output-dir", str(out), "--seed", str(seed), "--resume", "latest",
           "--set", f"data.latent_cache_dir={Path(data).parent / (Path(data).name + '-latents')}"]
    if max_steps is not None:
        cmd += ["--max-steps", str(max_steps)]
    return cmd + list(extra)


def train_adapter(assets: Path, data: Path, out: str | Path, preset: str, seed: int = 0,
                  max_steps: Optional[int] = None, extra: tuple[str, ...] = (), quiet: bool = False) -> Path:
    """Run the trainer (resuming a run that was interrupted); returns `out` once adapter.safetensors exists.

    Its output goes to <out>/train.log; unless `quiet`, its progress bar also shows on this terminal."""
    out = Path(out)
    if (out / "adapter.safetensors").is_file() and (out / "timings.json").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    cmd = train_command(assets, data, out, preset, seed, max_steps, extra)
    logger.info("training %s: %s", out.name, " ".join(cmd))
    with open(out / "train.log", "a", encoding="utf-8") as log_file:
        # stdout (config, summaries) to the log; stderr (tqdm's bar, warnings) to the terminal and the log
        # One thread: these models are tiny, and on a shared 2-core machine two OpenMP threads per process made
        # the trainer 5-10x slower while other jobs ran (measured: 1.1 -> 5-10 s/step), see bench/shapes/assets.py.
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        process = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.PIPE, text=True, bufsize=1, env=env)
        for line in process.stderr:
            log_file.write(line)
            if not quiet:
                sys.stderr.write(line)
        code = process.wait()
    if code != 0:
        tail = (out / "train.log").read_text(encoding="utf-8").splitlines()[-30:]
        raise RuntimeError(f"the trainer failed (exit {code}) for {out}:\n" + "\n".join(tail))
    return out


def load_checkpoint_adapter(checkpoint: str | Path):
    """The adapter of a training checkpoint, with its EMA weights when it has them (what export() writes): ours, or
    an ELLA / RouWei module trained from scratch (training.train --arch)."""
    import torch

    from adapter import AdapterConfig
    from adapter.file_format import build_module
    from training import checkpoint as ckpt

    saved = ckpt.load(Path(checkpoint))
    # ours, or an ELLA / RouWei module started with --arch (its AdapterConfig has `architecture`)
    adapter = build_module(AdapterConfig.from_dict(saved["state"]["adapter_config"]))
    weights = saved["ema"] if saved["ema"] is not None else {
        k.removeprefix("adapter."): v for k, v in saved["trainable"].items() if k.startswith("adapter.")}
    adapter.load_state_dict(weights, strict=True)
    return adapter.to(torch.float32).eval()
