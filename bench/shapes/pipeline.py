"""The shapes benchmark's moving parts between assets and numbers: the training images and an adapter trained
with the trainer's real command line (a checkpoint's adapter is training.checkpoint.load_checkpoint_adapter).

    data = ensure_train_data(cache / data_name(8000, holdout_of(assets)), heldout=holdout_of(assets))
    run = train_adapter(assets, data, out / "dynamic-kl-s0", preset="dynamic-kl", seed=0)

The trainer runs as a subprocess (`python -m training.train --preset <arm> --config bench/shapes/adapter.toml
...`), exactly as a user runs it: nothing here re-implements its loop.
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Optional

from devkit.processes import spawn

from .assets import BASE_FOLDER, LM_FOLDER
from .splits import HELDOUT, HeldOut

__all__ = ["SHAPES_CONFIG", "captions_beside", "data_name", "ensure_captions", "ensure_train_data", "train_adapter", "train_command"]

logger = logging.getLogger(__name__)

SHAPES_CONFIG = Path(__file__).with_name("adapter.toml")
TRAIN_IMAGES = 8000  # the scenes the tiny base was trained on (BaseConfig.train_images, same seed)
DONE = ".complete"


def data_name(n: int, heldout: HeldOut = HELDOUT) -> str:
    """The cache name of n train scenes of a holdout design: "train-8000", or "train-8000-scenes" for the
    "scenes" design (bench/shapes/splits.py), so bases built around different splits never share data."""
    return f"train-{n}" + ("" if heldout == HELDOUT else f"-{heldout.name}")


def captions_beside(data: Path) -> Path:
    """Where the captions-only file of a training-scenes folder lives: "<folder>-captions.txt" beside it."""
    return data.parent / f"{data.name}-captions.txt"


def ensure_train_data(folder: str | Path, n: int = TRAIN_IMAGES, seed: int = 0, heldout: HeldOut = HELDOUT) -> Path:
    """An image folder of n train-split scenes with .txt captions (the trainer's format); written once. Name it
    with `data_name`."""
    from .scenes import generate, write_image_folder

    folder = Path(folder)
    if (folder / DONE).is_file():
        return folder
    logger.info("writing %d training scenes to %s", n, folder)
    write_image_folder(folder, generate("train", n, seed, heldout))
    (folder / DONE).write_text(f"{n} train scenes, seed {seed}, holdout {heldout.name}\n", encoding="utf-8")
    return folder


def ensure_captions(path: str | Path, n: int = TRAIN_IMAGES, seed: int = 0, heldout: HeldOut = HELDOUT) -> Path:
    """The captions of the n train-split scenes ensure_train_data draws, one per line: all the distill stage
    reads (no images are written)."""
    from .scenes import generate

    path = Path(path)
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(f"{s.caption}\n" for s in generate("train", n, seed, heldout)), encoding="utf-8")
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
        # tied to this process: a study or demo that is killed (or a test that kills it) leaves no trainer behind
        process = spawn(cmd, parent_death_signal=signal.SIGTERM, stdout=log_file, stderr=subprocess.PIPE, text=True,
                        bufsize=1, env=env)
        for line in process.stderr:
            log_file.write(line)
            if not quiet:
                sys.stderr.write(line)
        code = process.wait()
    if code != 0:
        tail = (out / "train.log").read_text(encoding="utf-8").splitlines()[-30:]
        raise RuntimeError(f"the trainer failed (exit {code}) for {out}:\n" + "\n".join(tail))
    return out
