"""Build one shapes assets folder: a tiny LM and a tiny base model (the weak teacher), from seeds.

    python -m bench.shapes.assets [--out assets/shapes-bow] [--seed 0] [--quick] [--force]
                                  [--toy-clip FOLDER] [--vae-from BASE_FOLDER]
                                  [--lm-from LM_FOLDER] [--base-from ASSETS_FOLDER] [--holdout pairings|scenes]
                                  [--unet-steps N]

writes
    <out>/tiny-lm/           Hugging Face folder: a 4-block Llama + word-level tokenizer with a chat template
    <out>/tiny-base/         diffusers StableDiffusionPipeline folder: VAE, UNet, bag-of-words CLIP, tokenizer, DDPM
    <out>/teacher_samples.png  the teacher's first 16 held-out samples, for a look
    <out>/manifest.json      sizes and sha256 of every file, training statistics and times, the LM's
                             perplexities, the VAE round-trip and teacher scores (bench/shapes/scorer.py)

Without part flags it builds the bag-of-words assets (assets/shapes-bow: the study's negative control). The
shipped assets/shapes (`make shapes-assets`, bench/shapes/shipped.py) are a chain of this command's builds:
a toy-CLIP base and a binding LM, composed.

Everything is trained here on the CPU from generated scenes (no download), deterministically from
`--seed` on a given machine and library versions. The folder is built under a temporary sibling and
renamed at the end, so an interrupted run leaves nothing half-written; `ensure_assets()` reuses a
finished folder whose manifest matches (version, seed, quick). `--quick` builds miniature models in
seconds, for tests only: they are untrained and useless for measurements.

`--toy-clip FOLDER` builds the base on a contextual teacher instead of the bag of words: the toy CLIP's
tokenizer and text encoder (`python -m bench.shapes.toy_clip`) are frozen and the UNet learns to read
them, as SD's UNet learnt to read CLIP. `--vae-from BASE_FOLDER` reuses an already built base's VAE
(30 CPU-minutes saved; bases that differ only in their text side then share the same latents).
`--lm-from LM_FOLDER` takes an LM built by `python -m bench.shapes.tiny_lm` (e.g. a binding LM) instead of
training the default one, and `--base-from ASSETS_FOLDER` an already built folder's base, teacher scores and
samples instead of training a base: together they pair a new LM with a built base in seconds, and the
manifest records where each part came from.

`--holdout scenes` trains the base (and asks that the toy CLIP was trained) with the "scenes" design of the
held-out split (bench/shapes/splits.py): every colour-shape pairing drawn alone, two-object scenes using a
held-out pairing held out. The manifest's "holdout" records it, and `holdout_of(folder)` is what every
consumer (training data, held-out prompts, oracle, study) asks. `--unet-steps N` trains the base UNet longer
or shorter than the shipped 2,500 steps (about 0.65 s a step on one core), the teacher-calibration knob.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np

from .splits import HOLDOUTS, HeldOut, holdout_named

__all__ = ["ASSETS_VERSION", "BOW_DIR", "DEFAULT_DIR", "build_assets", "built_for", "ensure_assets", "holdout_of",
           "read_manifest", "teacher_kind"]

logger = logging.getLogger(__name__)

ASSETS_VERSION = 2  # bump when what the builders make changes, so stale folders are rebuilt
DEFAULT_DIR = Path("assets/shapes")  # the shipped assets: a toy-CLIP base and a binding LM (bench/shapes/shipped.py)
BOW_DIR = Path("assets/shapes-bow")  # the bag-of-words base and LM this module builds by default: the negative control
MANIFEST = "manifest.json"
LM_FOLDER, BASE_FOLDER = "tiny-lm", "tiny-base"


def _file_table(folder: Path) -> dict[str, dict]:
    """{relative path: {bytes, sha256}} of every file under folder (sorted, so the manifest is stable)."""
    table = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        table[path.relative_to(folder).as_posix()] = {"bytes": path.stat().st_size,
                                                      "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    return table


def _save_grid(path: Path, images: np.ndarray, columns: int = 8) -> None:
    from PIL import Image

    images = images[: 2 * columns]
    rows = -(-len(images) // columns)
    h, w = images.shape[1:3]
    grid = np.full((rows * (h + 2), columns * (w + 2), 3), 255, np.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        grid[r * (h + 2):r * (h + 2) + h, c * (w + 2):c * (w + 2) + w] = image
    Image.fromarray(grid).save(path)


def read_manifest(folder: str | Path) -> dict:
    """The manifest of a finished assets folder; FileNotFoundError with what to run if there is none."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{folder} has no {MANIFEST}: it is not a finished shapes-assets folder; build it "
                                f"with `make shapes-assets` (the shipped assets: python -m bench.shapes.shipped --out "
                                f"{folder}) or `python -m bench.shapes.assets --out {folder}` (the bag-of-words ones)")
    return json.loads(path.read_text(encoding="utf-8"))


def teacher_kind(folder: str | Path) -> str:
    """What the base's own text encoder is, in words: "bag of words" (the shipped base) or "toy CLIP" (--toy-clip)."""
    return "bag of words" if read_manifest(folder)["base"].get("text_side", "bag-of-words") == "bag-of-words" \
        else "toy CLIP"


def holdout_of(folder: str | Path, if_missing: str | None = None) -> HeldOut:
    """The held-out split (splits.HeldOut) the assets' base was trained around; folders from before the "scenes"
    design have no field and are "pairings". `if_missing`: the split named so when `folder` holds no assets
    (otherwise read_manifest's FileNotFoundError)."""
    if if_missing is not None and not (Path(folder) / MANIFEST).is_file():
        return holdout_named(if_missing)
    return holdout_named(read_manifest(folder).get("holdout", "pairings"))


def build_assets(out: str | Path = BOW_DIR, seed: int = 0, quick: bool = False, force: bool = False,
                 threads: int = 1, toy_clip: str | Path | None = None, vae_from: str | Path | None = None,
                 lm_from: str | Path | None = None, base_from: str | Path | None = None,
                 holdout: str = "pairings", unet_steps: int | None = None) -> Path:
    """Train both models (or copy them: `lm_from`, `base_from`), evaluate the base, write the manifest; returns
    `out`. Refuses to overwrite unless force. `holdout` names the split design the base is trained around; with
    `base_from` it is the copied base's. `unet_steps` overrides the base config's UNet steps."""
    import torch
    import diffusers
    import transformers

    from .scenes import generate, heldout_prompts
    from .tiny_base import BaseConfig, build_tiny_base, teacher_scores
    from .tiny_lm import LMConfig, build_tiny_lm

    out = Path(out)
    if out.exists() and not force:
        raise FileExistsError(f"{out} already exists; pass --force to rebuild it, or use it as it is")
    _check_parts(lm_from, base_from, seed, quick, toy_clip, vae_from, holdout)
    if base_from is not None:
        holdout = holdout_of(base_from).name
    heldout = holdout_named(holdout)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    lm_config, base_config = (LMConfig.quick(), BaseConfig.quick()) if quick else (LMConfig(), BaseConfig())
    base_config = dataclasses.replace(base_config, holdout=holdout,
                                      unet_steps=base_config.unet_steps if unet_steps is None else unet_steps)
    start = time.perf_counter()
    try:
        with _reproducible(threads):
            if lm_from is not None:
                shutil.copytree(lm_from, tmp / LM_FOLDER)
                lm_stats = json.loads((Path(lm_from) / "stats.json").read_text(encoding="utf-8"))
            else:
                _, lm_stats = build_tiny_lm(tmp / LM_FOLDER, lm_config, seed)
            if base_from is not None:
                shutil.copytree(Path(base_from) / BASE_FOLDER, tmp / BASE_FOLDER)
                shutil.copy2(Path(base_from) / "teacher_samples.png", tmp / "teacher_samples.png")
                base_stats = read_manifest(base_from)["base"]
            else:
                base_folder, base_stats = build_tiny_base(tmp / BASE_FOLDER, base_config, seed,
                                                          text_side_from=toy_clip, vae_from=vae_from)
                if toy_clip is not None:
                    base_stats["toy_clip"] = json.loads((Path(toy_clip) / "stats.json").read_text(encoding="utf-8"))
                t0 = time.perf_counter()
                held, images = teacher_scores(base_folder, heldout_prompts(base_config.eval_prompts, seed, heldout),
                                              base_config, seed)
                val_captions = [s.caption for s in
                                generate("val", max(1, base_config.eval_prompts // 2), seed, heldout)]
                val, _ = teacher_scores(base_folder, val_captions, base_config, seed)
                base_stats["teacher"] = {"heldout": held, "val": val, "sampler": "DDIM",
                                         "steps": base_config.eval_steps, "guidance_scale": base_config.guidance_scale,
                                         "eval_seconds": round(time.perf_counter() - t0, 1)}
                _save_grid(tmp / "teacher_samples.png", images)
        files = _file_table(tmp)
        manifest = {
            "format": "shapes-assets", "version": ASSETS_VERSION, "seed": seed, "quick": quick,
            "libraries": {"torch": torch.__version__, "transformers": transformers.__version__,
                          "diffusers": diffusers.__version__},
            "torch_threads": threads,
            "holdout": holdout,
            "total_seconds": round(time.perf_counter() - start, 1),
            "total_bytes": sum(f["bytes"] for f in files.values()),
            "lm": {"folder": LM_FOLDER, **lm_stats},
            "base": {"folder": BASE_FOLDER, **base_stats},
            "files": files,
        }
        if lm_from is not None or base_from is not None:
            manifest["composed_from"] = {"lm": str(lm_from) if lm_from else None,
                                         "base": str(base_from) if base_from else None}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        if out.exists():  # --force: replace only once the new folder is complete
            shutil.rmtree(out)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("shapes assets: %.1f MB in %.0f s -> %s", manifest["total_bytes"] / 1e6, manifest["total_seconds"], out)
    return out


def built_for(manifest: dict, seed: int, quick: bool) -> bool:
    """Whether a manifest is of this assets version, seed and mode (the key a folder is reused by)."""
    return (manifest.get("version"), manifest.get("seed"), manifest.get("quick")) == (ASSETS_VERSION, seed, quick)


def _check_parts(lm_from, base_from, seed: int, quick: bool, toy_clip, vae_from, holdout: str = "pairings") -> None:
    """ValueError saying what is wrong with a copied part, before any work."""
    holdout_named(holdout)
    if toy_clip is not None:
        trained_for = json.loads((Path(toy_clip) / "stats.json").read_text(encoding="utf-8"))["config"].get(
            "holdout", "pairings")
        if trained_for != holdout:
            raise ValueError(f"--toy-clip {toy_clip} was trained with holdout {trained_for!r}, the base would be "
                             f"{holdout!r}: give --holdout {trained_for}, or retrain the toy CLIP with --holdout "
                             f"{holdout}")
    if lm_from is not None and not all((Path(lm_from) / name).is_file() for name in ("config.json", "stats.json")):
        raise ValueError(f"--lm-from {lm_from}: not an LM built by `python -m bench.shapes.tiny_lm --out FOLDER` "
                         "(it needs config.json and stats.json)")
    if base_from is None:
        return
    if toy_clip is not None or vae_from is not None:
        raise ValueError("--base-from copies a built base, text side and VAE included: drop --toy-clip / --vae-from, "
                         "or drop --base-from to train a new base")
    manifest = read_manifest(base_from)
    if holdout != "pairings" and manifest.get("holdout", "pairings") != holdout:
        raise ValueError(f"--base-from {base_from} was built with holdout {manifest.get('holdout', 'pairings')!r}, "
                         f"not {holdout!r}: --base-from keeps the copied base's holdout, drop --holdout")
    if not built_for(manifest, seed, quick):
        raise ValueError(f"--base-from {base_from} holds version {manifest.get('version')} seed {manifest.get('seed')} "
                         f"quick {manifest.get('quick')}, not version {ASSETS_VERSION} seed {seed} quick {quick}: "
                         "give the matching --seed / --quick, or rebuild that folder")


def ensure_assets(out: str | Path = DEFAULT_DIR, seed: int = 0, quick: bool = False) -> Path:
    """`out` if it holds finished assets of this version, seed and mode; otherwise build them there: the shipped
    folder (DEFAULT_DIR) with the shipped chain (bench/shapes/shipped.py), any other with build_assets."""
    out = Path(out)
    try:
        manifest = read_manifest(out)
    except FileNotFoundError:
        manifest = None
    if manifest and built_for(manifest, seed, quick):
        return out
    if not quick and out.resolve() == DEFAULT_DIR.resolve():  # the shipped folder is the shipped chain's
        from .shipped import build_shipped_assets

        return build_shipped_assets(out, seed=seed, force=True)
    if manifest and manifest["base"].get("text_side", "bag-of-words") != "bag-of-words":
        raise ValueError(f"{out} holds assets of another version, seed or mode, built on a toy CLIP teacher; "
                         f"rebuild them with `python -m bench.shapes.assets --out {out} --toy-clip FOLDER --force` "
                         f"(rebuilding here would silently replace the teacher with the bag of words)")
    if manifest:
        logger.info("rebuilding %s: it holds version %s seed %s quick %s", out, manifest.get("version"),
                    manifest.get("seed"), manifest.get("quick"))
    return build_assets(out, seed=seed, quick=quick, force=True)


@contextlib.contextmanager
def _reproducible(threads: int):
    """Deterministic algorithms and a fixed thread count for the build, restored afterwards (both are global).

    The thread count is part of reproducibility (it changes how reductions are split) and of speed:
    on a shared 2-core machine, two OpenMP threads per process ran these small convolutions 10-30x
    slower than one (measured), because each thread spins waiting for the other to be scheduled.
    """
    import torch

    previous = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(threads)
    try:
        with torch.random.fork_rng():
            yield
    finally:
        torch.use_deterministic_algorithms(previous[0])
        torch.set_num_threads(previous[1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.shapes.assets", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=BOW_DIR, help=f"output folder (default {BOW_DIR})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="miniature untrained models in seconds (tests only)")
    parser.add_argument("--force", action="store_true", help="rebuild even if --out exists")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: fastest on a busy machine, and part of reproducibility)")
    parser.add_argument("--toy-clip", type=Path, metavar="FOLDER",
                        help="train the base UNet on this toy CLIP's frozen text encoder instead of the bag of words "
                             "(a folder made by python -m bench.shapes.toy_clip)")
    parser.add_argument("--vae-from", type=Path, metavar="BASE_FOLDER",
                        help=f"reuse this built base's VAE instead of training one (e.g. {BOW_DIR}/tiny-base)")
    parser.add_argument("--lm-from", type=Path, metavar="LM_FOLDER",
                        help="copy this LM (python -m bench.shapes.tiny_lm --out LM_FOLDER) instead of training one")
    parser.add_argument("--base-from", type=Path, metavar="ASSETS_FOLDER",
                        help="copy this built assets folder's base and teacher scores instead of training a base")
    parser.add_argument("--holdout", choices=HOLDOUTS, default="pairings",
                        help="the held-out split's design the base is trained around (bench/shapes/splits.py)")
    parser.add_argument("--unet-steps", type=int, default=None, metavar="N",
                        help="train the base UNet for N steps instead of the config's (2500; --quick: 3)")
    args = parser.parse_args(argv)
    if args.unet_steps is not None and args.unet_steps < 1:
        parser.error(f"--unet-steps must be at least 1, got {args.unet_steps}")
    if args.unet_steps is not None and args.base_from is not None:
        parser.error("--unet-steps trains a base; --base-from copies one: give one of them")
    for flag, folder, part in (("--toy-clip", args.toy_clip, "text_encoder"), ("--vae-from", args.vae_from, "vae")):
        if folder is not None and not (folder / part).is_dir():
            parser.error(f"{flag} {folder}: no {part}/ folder there")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    try:
        _check_parts(args.lm_from, args.base_from, args.seed, args.quick, args.toy_clip, args.vae_from, args.holdout)
    except (ValueError, FileNotFoundError) as err:
        parser.error(str(err))
    if args.out.exists() and not args.force:
        parser.error(f"{args.out} already exists; pass --force to rebuild it, or use it as it is")
    out = build_assets(args.out, seed=args.seed, quick=args.quick, force=args.force, threads=args.threads,
                       toy_clip=args.toy_clip, vae_from=args.vae_from, lm_from=args.lm_from, base_from=args.base_from,
                       holdout=args.holdout, unet_steps=args.unet_steps)
    manifest = read_manifest(out)
    teacher = manifest["base"]["teacher"]["heldout"]
    print(f"wrote {out} ({manifest['total_bytes'] / 1e6:.1f} MB, {manifest['total_seconds']:.0f} s)")
    print(f"tiny LM perplexity: val {manifest['lm']['val_perplexity']:.3f}, held-out "
          f"{manifest['lm']['heldout_perplexity']:.3f}")
    print(f"VAE round trip overall accuracy (val): {manifest['base']['vae']['roundtrip_val']['overall']:.3f}")
    print("teacher on held-out prompts: " + ", ".join(f"{k} {v:.3f}" for k, v in teacher.items() if k != "n"))


if __name__ == "__main__":
    main()
