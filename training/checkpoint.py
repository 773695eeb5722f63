"""Training checkpoints: everything needed to continue bit-exactly, in safetensors and JSON (never pickle).

Layout of `<output_dir>/checkpoints/step-00000100/`:
    trainable.safetensors   the trained parameters (adapter, UNet LoRA, learned loss weighting)
    ema.safetensors         the adapter's EMA weights (when EMA is on)
    optimizer.safetensors   the optimizer's tensors; its other state sits in the file's metadata
    state.json              step, data position, counters, the resolved config, the adapter config
    COMPLETE                the sentinel, written last

`load_checkpoint_adapter(folder)` rebuilds the adapter a checkpoint holds, with the weights the run's export
would have written at that step (`adapter_weights` decides which: EMA or raw, for both).

A checkpoint is written into a hidden temporary folder, the sentinel goes in last, and only then is
the folder renamed into place, so `latest()` never returns a half-written checkpoint, whatever
moment the job dies at; a checkpoint of a step already on disk is swapped in with one atomic rename.
Only one run writes here at a time (training/output_lock.py). Randomness needs no saved RNG state:
the trainer draws each step's noise, timesteps and dropout from a generator seeded by (seed, step, rank).
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from adapter import AdapterConfig
from adapter.file_format import build_module

log = logging.getLogger(__name__)

SENTINEL = "COMPLETE"
ADAPTER_PREFIX = "adapter."  # the adapter's parameters among the trained module's (Student, Distiller)
_NAME = re.compile(r"^step-(\d{8})$")


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete or does not fit this run."""


def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """Finished checkpoints, oldest first."""
    folder = checkpoints_dir(output_dir)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if _NAME.match(p.name) and (p / SENTINEL).is_file()]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def latest(output_dir: str | Path) -> Optional[Path]:
    done = complete_checkpoints(output_dir)
    return done[-1] if done else None


def resolve_resume(resume: str, output_dir: str | Path) -> Optional[Path]:
    """'' -> None; 'latest' -> the newest complete checkpoint or None; a path -> that checkpoint (checked)."""
    if not resume:
        return None
    if resume == "latest":
        return latest(output_dir)
    path = Path(resume)
    if not (path / SENTINEL).is_file():
        raise CheckpointError(f"--resume {resume}: not a complete checkpoint folder (no {SENTINEL} file); "
                              f"use --resume latest or one of {[str(p) for p in complete_checkpoints(output_dir)]}")
    return path


def _optimizer_to_tensors(state: dict) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors, scalars = {}, {}
    for pid, entries in state["state"].items():
        for name, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"{pid}.{name}"] = value.detach().to("cpu").contiguous()
            else:
                scalars[f"{pid}.{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _optimizer_from_tensors(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for flat, value in list(tensors.items()) + list(meta["scalars"].items()):
        pid, name = flat.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save(output_dir: str | Path, step: int, trainable: dict[str, torch.Tensor], ema: Optional[dict[str, torch.Tensor]],
         optimizer_state: dict, state: dict[str, Any], keep: int) -> Path:
    """Write a checkpoint atomically (call on the main process only), then drop all but the newest `keep`."""
    folder = checkpoints_dir(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"step-{step:08d}"
    tmp = folder / f".tmp-step-{step:08d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({k: v.detach().to("cpu").contiguous() for k, v in trainable.items()}, str(tmp / "trainable.safetensors"))
    if ema is not None:
        save_file({k: v.detach().to("cpu").contiguous() for k, v in ema.items()}, str(tmp / "ema.safetensors"))
    opt_tensors, opt_meta = _optimizer_to_tensors(optimizer_state)
    save_file(opt_tensors, str(tmp / "optimizer.safetensors"), metadata={"optimizer": json.dumps(opt_meta)})
    (tmp / "state.json").write_text(json.dumps(state, indent=2), encoding="utf-8")
    _fsync_folder(tmp)
    (tmp / SENTINEL).write_text(f"step {step}\n", encoding="utf-8")
    _move_into_place(tmp, final)
    _rotate(output_dir, keep)
    log.info("checkpoint written: %s", final)
    return final


def _move_into_place(tmp: Path, final: Path) -> None:
    """Rename `tmp` to `final`. When `final` exists (the same step saved again, e.g. by a run resumed from an
    older checkpoint), the two are swapped in one atomic rename, so a complete checkpoint of that step is
    on disk at every moment; the old one is deleted after."""
    if not final.exists():
        os.rename(tmp, final)
        return
    if _exchange(tmp, final):
        shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the replaced checkpoint
        return
    # No atomic swap on this system: a crash between these two renames leaves the previous step as the latest.
    aside = final.with_name(f".old-{final.name}-{os.getpid()}")
    os.rename(final, aside)
    os.rename(tmp, final)
    shutil.rmtree(aside, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where the system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):  # a libc without the wrapper (glibc < 2.28, musl)
        return False
    at_fdcwd, rename_exchange = -100, 2
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    log.debug("renameat2(RENAME_EXCHANGE) failed (errno %d): replacing %s non-atomically", ctypes.get_errno(), b)
    return False


def load(path: Path, optimizer: bool = True) -> dict[str, Any]:
    """Read a checkpoint back: {'trainable', 'ema' (or None), 'optimizer', 'state'}. `optimizer=False` leaves the
    optimizer's file unread ('optimizer' is None): what reading a checkpoint's adapter needs."""
    if not (path / SENTINEL).is_file():
        raise CheckpointError(f"{path} is not a complete checkpoint (no {SENTINEL})")
    optimizer_state = None
    if optimizer:
        with safe_open(str(path / "optimizer.safetensors"), framework="pt") as handle:
            meta = json.loads(handle.metadata()["optimizer"])
            optimizer_state = _optimizer_from_tensors({k: handle.get_tensor(k) for k in handle.keys()}, meta)
    ema_file = path / "ema.safetensors"
    return {
        "trainable": load_file(str(path / "trainable.safetensors")),
        "ema": load_file(str(ema_file)) if ema_file.is_file() else None,
        "optimizer": optimizer_state,
        "state": json.loads((path / "state.json").read_text(encoding="utf-8")),
    }


def adapter_weights(parameters: dict[str, torch.Tensor],
                    ema: Optional[dict[str, torch.Tensor]]) -> tuple[dict[str, torch.Tensor], str]:
    """The adapter weights a run exports, and which they are ('ema' or 'raw'): the EMA weights when the run
    keeps an EMA, else the trained weights themselves (the `adapter.` entries of `parameters`, the trained
    module's parameters by name). export() writes these and load_checkpoint_adapter() reads them back, so a
    checkpoint's adapter is the file its run would have exported at that step."""
    if ema is not None:
        return ema, "ema"
    return {k.removeprefix(ADAPTER_PREFIX): v for k, v in parameters.items() if k.startswith(ADAPTER_PREFIX)}, "raw"


def load_checkpoint_adapter(checkpoint: str | Path) -> torch.nn.Module:
    """The adapter of a training checkpoint (fp32, eval mode), with the weights adapter_weights() picks: ours, or an
    ELLA / RouWei module trained from scratch (`--arch`; its AdapterConfig has `architecture`)."""
    saved = load(Path(checkpoint), optimizer=False)
    adapter = build_module(AdapterConfig.from_dict(saved["state"]["adapter_config"]))
    weights, _ = adapter_weights(saved["trainable"], saved["ema"])
    adapter.load_state_dict(weights, strict=True)
    return adapter.to(torch.float32).eval()


def _rotate(output_dir: str | Path, keep: int) -> None:
    folder = checkpoints_dir(output_dir)
    # Left behind by a process that died mid-write. Safe to delete: the run holds the output folder's lock
    # (training/output_lock.py), so no other live run writes here.
    for stale in [*folder.glob(".tmp-step-*"), *folder.glob(".old-step-*")]:
        if not stale.name.endswith(f"-{os.getpid()}"):
            shutil.rmtree(stale, ignore_errors=True)
    done = complete_checkpoints(output_dir)
    for old in done[: max(0, len(done) - max(1, keep))]:
        shutil.rmtree(old, ignore_errors=True)


def _fsync_folder(folder: Path) -> None:
    """Flush the files before the sentinel, so 'sentinel present' really means 'data on disk'."""
    for item in folder.iterdir():
        with open(item, "rb") as handle:
            os.fsync(handle.fileno())
