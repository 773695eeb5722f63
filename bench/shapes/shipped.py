"""`make shapes-assets`: the shipped shapes assets (assets/shapes), built as a chain of the benchmark's builders.

    python -m bench.shapes.shipped [--out assets/shapes] [--bow assets/shapes-bow] [--work outputs/shapes-build]
                                   [--seed 0] [--force] [--quick]

The shipped base is the one on which the study's gates were measured (docs/shapes_oracle_probe.md): a UNet that
learnt to read a contextual, contrastively trained toy CLIP, on the "scenes" holdout (every colour-shape pairing
drawn alone in training; the two-object scenes that use a held-out pairing held out), with an LM whose noun states
carry the binding. Each step is the command the docs give for it:

1. bag of words  <bow>: `python -m bench.shapes.assets` (the bag-of-words base and its LM): the study's negative
                 control, and the VAE the toy-CLIP base reuses (both bases then share every latent). Shipped;
                 built only when missing or of another version, seed or mode.
2. toy CLIP      <work>/toy-clip-scenes-h05: `python -m bench.shapes.toy_clip --hard-negatives 0.5 --holdout scenes`
3. base          <work>/base: `python -m bench.shapes.assets --toy-clip <work>/toy-clip-scenes-h05
                 --vae-from <bow>/tiny-base --holdout scenes --unet-steps 5000` (its teacher scores are measured here)
4. LM            <work>/lm: `python -m bench.shapes.tiny_lm --binding-aux 1.0 --steps 2000`
5. compose       <out>: `python -m bench.shapes.assets --lm-from <work>/lm --base-from <work>/base`

About 45 minutes on one core with the bag-of-words base in place (the UNet's 5,000 steps are most of it), two
and a quarter hours from nothing. Every part is written under a temporary name and renamed when finished, and a
finished part of this recipe is reused, so an interrupted build resumes at the part it stopped in; `--force`
rebuilds the parts in <work> (not <bow>) and replaces <out>. `--quick` builds the same chain from miniature, untrained parts
in seconds (tests only).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shutil
from pathlib import Path

from .assets import BASE_FOLDER, BOW_DIR, DEFAULT_DIR, build_assets, built_for, ensure_assets, read_manifest
from .tiny_lm import LMConfig
from .toy_clip import ToyClipConfig

logger = logging.getLogger(__name__)

WORK_DIR = Path("outputs/shapes-build")
HOLDOUT = "scenes"
UNET_STEPS = 5000  # twice the bag-of-words base's 2,500: the teacher then reaches colour 0.8 in distribution
TOY_CLIP = ToyClipConfig(hard_negatives=0.5, holdout=HOLDOUT)
BINDING_LM = dataclasses.replace(LMConfig(), binding_aux=1.0, steps=2000)


def _quick_parts(seed: int) -> tuple[ToyClipConfig, int, LMConfig]:
    return (dataclasses.replace(TOY_CLIP, width=32, steps=2, batch=8, train_images=40, eval_images=8, seed=seed), 2,
            dataclasses.replace(LMConfig.quick(), binding_aux=1.0))


def _stats(folder: Path) -> dict | None:
    """A finished toy CLIP's or LM's stats.json (written last), or None."""
    path = folder / "stats.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _base_is(folder: Path, seed: int, quick: bool, toy_config: ToyClipConfig, unet_steps: int) -> bool:
    """Whether `folder` holds a finished base of this version, seed and mode, built on this toy CLIP recipe."""
    try:
        manifest = read_manifest(folder)
    except FileNotFoundError:
        return False
    return (built_for(manifest, seed, quick) and manifest["base"]["config"]["unet_steps"] == unet_steps
            and manifest["base"].get("toy_clip", {}).get("config") == dataclasses.asdict(toy_config))


def _write_part(dest: Path, write) -> None:
    """write(folder) into a temporary sibling, then put it at `dest` (replacing a part of another recipe)."""
    tmp = dest.with_name(f".{dest.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)


def _toy_clip(dest: Path, config: ToyClipConfig) -> None:
    from .toy_clip import save, train_toy_clip

    _write_part(dest, lambda tmp: save(*train_toy_clip(config), tmp))


def _lm(dest: Path, config: LMConfig, seed: int) -> None:
    from .tiny_lm import build_tiny_lm, save_stats

    _write_part(dest, lambda tmp: save_stats(*build_tiny_lm(tmp, config, seed)))


def build_shipped_assets(out: str | Path = DEFAULT_DIR, bow: str | Path = BOW_DIR, work: str | Path = WORK_DIR,
                         seed: int = 0, force: bool = False, quick: bool = False) -> Path:
    """Steps 1-5 of the module docstring; returns `out`. Refuses to replace `out` unless force."""
    import torch

    out, work = Path(out), Path(work)
    if len({out.resolve(), Path(bow).resolve(), work.resolve()}) < 3:
        raise ValueError(f"--out {out}, --bow {bow} and --work {work} must be three different folders "
                         "(--force empties --work and replaces --out)")
    if out.exists() and not force:
        raise FileExistsError(f"{out} already exists; pass --force to rebuild it, or use it as it is")
    toy_config, unet_steps, lm_config = _quick_parts(seed) if quick else (
        dataclasses.replace(TOY_CLIP, seed=seed), UNET_STEPS, BINDING_LM)
    if force:
        shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    bow = ensure_assets(bow, seed=seed, quick=quick)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the builders' setting (bench/shapes/assets.py: fastest and reproducible here)
    try:
        # A part is reused only if it was built with this recipe (a --quick run may have left miniature ones).
        toy_clip = work / "toy-clip-scenes-h05"  # the base's manifest records this name as its text side
        if (_stats(toy_clip) or {}).get("config") != dataclasses.asdict(toy_config):
            logger.info("shipped assets, toy CLIP -> %s", toy_clip)
            _toy_clip(toy_clip, toy_config)
        base = work / "base"
        if not _base_is(base, seed, quick, toy_config, unet_steps):
            build_assets(base, seed=seed, quick=quick, force=True, toy_clip=toy_clip, vae_from=bow / BASE_FOLDER,
                         holdout=HOLDOUT, unet_steps=unet_steps)
        lm = work / "lm"
        if (_stats(lm) or {}).get("config") != dataclasses.asdict(lm_config):
            logger.info("shipped assets, binding LM -> %s", lm)
            _lm(lm, lm_config, seed)
    finally:
        torch.set_num_threads(previous_threads)
    return build_assets(out, seed=seed, quick=quick, force=force, lm_from=lm, base_from=base)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.shapes.shipped", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_DIR,
                        help=f"the assets folder to write (default {DEFAULT_DIR})")
    parser.add_argument("--bow", type=Path, default=BOW_DIR,
                        help=f"the bag-of-words assets: reused, or built there first (default {BOW_DIR})")
    parser.add_argument("--work", type=Path, default=WORK_DIR, help=f"the parts' folder (default {WORK_DIR})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="rebuild the parts in --work and replace --out")
    parser.add_argument("--quick", action="store_true", help="miniature untrained parts in seconds (tests only)")
    args = parser.parse_args(argv)
    if args.out.exists() and not args.force:
        parser.error(f"{args.out} already exists; pass --force to rebuild it, or use it as it is")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    try:
        out = build_shipped_assets(args.out, args.bow, args.work, seed=args.seed, force=args.force, quick=args.quick)
    except ValueError as error:
        parser.error(str(error))
    teacher = read_manifest(out)["base"]["teacher"]["heldout"]
    print(f"wrote {out}; teacher (toy CLIP) on held-out prompts: "
          + ", ".join(f"{k} {v:.3f}" for k, v in teacher.items() if k != "n"))


if __name__ == "__main__":
    main()
