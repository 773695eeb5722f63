"""Scenes of the shapes benchmark: sampling, exact rendering, and the dataset API the trainer reads.

Images are 64x64 RGB: small enough for a tiny VAE/UNet on a CPU (latents 16x16 with a 4x VAE, 8x8 with
an 8x one), large enough that a 10-pixel shape survives a VAE round trip. Objects sit on a 3x3 grid,
one per cell, in two sizes (10 and 16 px) with a few pixels of jitter; every gap between objects is at
least 3 px, so two objects of one colour never touch and the scorer always sees them as two regions.
Shapes are painted without anti-aliasing in six colours chosen far apart (and so that a blurred
colour-background edge never looks like a third colour) on a neutral grey, so a true render snaps back
to the palette exactly.

    samples = generate("train", 1000, seed=0)       # list[Sample(image uint8 HxWx3, caption, spec, objects)]
    write_image_folder("data/shapes-train", samples)  # 000000.png + 000000.txt ... (the trainer's format)
    prompts = heldout_prompts(256)                  # distinct held-out captions

Sample i of a (split, seed) depends on nothing else, so generate(split, 10) is a prefix of generate(split, 1000).

    python -m bench.shapes.scenes --split train --n 2000 --out data/shapes-train
    python -m bench.shapes.scenes --prompts 256 > heldout_prompts.txt
"""
from __future__ import annotations

import argparse
import os
import shutil
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from .captions import (COLOURS, COUNTS, GRID, KINDS, POSITIONS, RELATIONS, SHAPES, SIZES, ObjectSpec, SceneSpec,
                       caption_for)
from .splits import HELDOUT, SPLITS, HeldOut, in_split

IMAGE_SIZE = 64
CELL = IMAGE_SIZE / GRID
BACKGROUND = (128, 128, 128)
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (40, 70, 220),
    "yellow": (240, 220, 30),
    "purple": (160, 40, 200),
    "white": (240, 240, 240),
}
SIZE_PX = {"small": 10, "large": 16}  # side of the object's square bounding box
JITTER_PX = {"small": 3, "large": 1}  # max offset from the cell centre, per axis; keeps >= 3 px gaps
assert tuple(PALETTE) == COLOURS and tuple(SIZE_PX) == SIZES


@dataclass(frozen=True)
class PlacedObject:
    """One drawn object: its attributes, its grid cell, and its exact bounding box in pixels."""

    colour: str
    shape: str
    size: str
    cell: tuple[int, int]  # (row, col)
    x0: int  # left column of the bounding box
    y0: int  # top row
    side: int  # the box is side x side


@dataclass(frozen=True)
class Sample:
    image: np.ndarray  # uint8 [IMAGE_SIZE, IMAGE_SIZE, 3]
    caption: str
    spec: SceneSpec  # what the caption asserts (== parse_caption(caption))
    objects: tuple[PlacedObject, ...]  # what the image shows


@lru_cache(maxsize=None)
def shape_mask(shape: str, height: int, width: int) -> np.ndarray:
    """The ideal pixels of `shape` filling a height x width box (bool, read-only).

    Renderer and scorer share it: the scorer classifies a region by which ideal shape, drawn in the
    region's own bounding box, overlaps it best. Every shape touches all four sides of its box.
    """
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choose one of {SHAPES}")
    y = (np.arange(height)[:, None] + 0.5) / height  # pixel centres in [0, 1]
    x = (np.arange(width)[None, :] + 0.5) / width
    if shape == "square":
        mask = np.ones((height, width), bool)
    elif shape == "circle":  # an ellipse inscribed in the box
        mask = (x - 0.5) ** 2 + (y - 0.5) ** 2 <= 0.25
    else:  # triangle, apex up: half-width at row i is (i + 1) / height of the half box, so row 0 is not empty
        rows = (np.arange(height)[:, None] + 1) / height
        mask = np.abs(x - 0.5) <= rows / 2
    mask = np.broadcast_to(mask, (height, width)).copy()
    mask.flags.writeable = False
    return mask


def render(objects: tuple[PlacedObject, ...] | list[PlacedObject]) -> np.ndarray:
    """Paint objects on the background: exact palette colours, no anti-aliasing."""
    image = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    image[:] = BACKGROUND
    for o in objects:
        box = image[o.y0:o.y0 + o.side, o.x0:o.x0 + o.side]
        if box.shape[:2] != (o.side, o.side):
            raise ValueError(f"{o} does not fit in a {IMAGE_SIZE}x{IMAGE_SIZE} image")
        box[shape_mask(o.shape, o.side, o.side)] = PALETTE[o.colour]
    return image


# --- sampling ---

def _distinct_objects(rng: np.random.Generator) -> tuple[ObjectSpec, ObjectSpec]:
    """Two objects that differ in colour or shape (or both)."""
    i, j = rng.choice(len(COLOURS) * len(SHAPES), size=2, replace=False)
    return tuple(ObjectSpec(COLOURS[k // len(SHAPES)], SHAPES[k % len(SHAPES)]) for k in (i, j))


def sample_spec(kind: str, rng: np.random.Generator) -> SceneSpec:
    """A random spec of one kind, over all combinations (no split applied)."""
    pick = lambda options: options[rng.integers(len(options))]  # noqa: E731
    if kind == "single":
        obj = ObjectSpec(pick(COLOURS), pick(SHAPES), size=pick(SIZES), position=pick(list(POSITIONS)))
        return SceneSpec(kind, (obj,))
    if kind == "count":
        return SceneSpec(kind, (ObjectSpec(pick(COLOURS), pick(SHAPES), count=pick(COUNTS)),))
    if kind == "pair":
        return SceneSpec(kind, _distinct_objects(rng))
    if kind == "relation":
        return SceneSpec(kind, _distinct_objects(rng), relation=pick(RELATIONS))
    raise ValueError(f"unknown scene kind {kind!r}; choose one of {KINDS}")


def _cells(spec: SceneSpec, rng: np.random.Generator) -> list[tuple[int, int]]:
    """One grid cell per drawn object, in the order of spec.objects (counts expanded)."""
    if spec.kind == "single":
        return [spec.objects[0].position]
    if spec.kind == "relation":
        # Same row for left/right, same column for above/below: the picture shows exactly the stated relation.
        line = int(rng.integers(GRID))
        first, second = sorted(rng.choice(GRID, size=2, replace=False).tolist())
        if spec.relation in ("right of", "below"):
            first, second = second, first
        horizontal = spec.relation in ("left of", "right of")
        return [(line, first), (line, second)] if horizontal else [(first, line), (second, line)]
    cells = rng.choice(GRID * GRID, size=spec.num_objects, replace=False)
    return [(int(c) // GRID, int(c) % GRID) for c in cells]


def layout(spec: SceneSpec, rng: np.random.Generator) -> tuple[PlacedObject, ...]:
    """Concrete objects for a spec: cells, sizes (random where the caption is silent), jittered boxes."""
    placed = []
    expanded = [o for o in spec.objects for _ in range(o.count)]
    for obj, (row, col) in zip(expanded, _cells(spec, rng)):
        size = obj.size or SIZES[rng.integers(len(SIZES))]
        side, jitter = SIZE_PX[size], JITTER_PX[size]
        dx, dy = rng.integers(-jitter, jitter + 1, size=2)
        x0 = round((col + 0.5) * CELL - side / 2) + int(dx)
        y0 = round((row + 0.5) * CELL - side / 2) + int(dy)
        placed.append(PlacedObject(obj.colour, obj.shape, size, (row, col), x0, y0, side))
    return tuple(placed)


def sample_scene(split: str, rng: np.random.Generator, heldout: HeldOut = HELDOUT) -> tuple[SceneSpec, str, tuple]:
    """(spec, caption, objects) of one scene of `split`: a uniform kind, then specs until one is in the split."""
    kinds = heldout.kinds(split)
    kind = kinds[rng.integers(len(kinds))]
    for _ in range(10_000):
        spec = sample_spec(kind, rng)
        if in_split(spec, split, heldout):
            return spec, caption_for(spec, rng), layout(spec, rng)
    raise RuntimeError(f"no {kind!r} scene of split {split!r} in 10000 draws; is the held-out set {heldout} sensible?")


def generate(split: str, n: int, seed: int = 0, heldout: HeldOut = HELDOUT) -> list[Sample]:
    """n rendered samples of `split` ("train", "val" or "heldout"), deterministic in (split, seed, index)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    samples = []
    for i in range(n):
        rng = np.random.default_rng([seed, SPLITS.index(split), i])
        spec, caption, objects = sample_scene(split, rng, heldout)
        samples.append(Sample(render(objects), caption, spec, objects))
    return samples


def heldout_prompts(n: int = 256, seed: int = 0, heldout: HeldOut = HELDOUT) -> list[str]:
    """n held-out captions with pairwise different specs (deterministic)."""
    return split_prompts("heldout", n, seed, heldout)


def split_prompts(split: str, n: int, seed: int = 0, heldout: HeldOut = HELDOUT) -> list[str]:
    """n captions of `split` with pairwise different specs (deterministic); "val" gives in-distribution prompts."""
    prompts, seen = [], set()
    for i in range(100 * n):
        spec, caption, _ = sample_scene(split, np.random.default_rng([seed, SPLITS.index(split), i]), heldout)
        if spec not in seen:
            seen.add(spec)
            prompts.append(caption)
            if len(prompts) == n:
                return prompts
    raise ValueError(f"the {split} split has fewer than {n} distinct specs; ask for fewer prompts")


def write_image_folder(folder: str | os.PathLike, samples: list[Sample]) -> Path:
    """Write NNNNNN.png + NNNNNN.txt (caption, no trailing newline) per sample; returns the folder.

    The folder is built under a temporary sibling name and renamed at the end, so an interrupted run
    never leaves a half-written dataset behind (a cache check can just test that the folder exists).
    """
    folder = Path(folder)
    if folder.exists():
        raise FileExistsError(f"{folder} already exists; remove it or choose another folder "
                              f"(datasets are written once)")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        for i, sample in enumerate(samples):
            Image.fromarray(sample.image, "RGB").save(tmp / f"{i:06d}.png")
            (tmp / f"{i:06d}.txt").write_text(sample.caption, encoding="utf-8")
        os.rename(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], prog="python -m bench.shapes.scenes")
    parser.add_argument("--split", choices=SPLITS, default="train")
    parser.add_argument("--n", type=int, default=1000, help="number of samples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="write an image folder (PNG + .txt captions) here")
    parser.add_argument("--prompts", type=int, metavar="N", help="print N distinct held-out captions instead")
    args = parser.parse_args(argv)
    if args.prompts:
        print("\n".join(heldout_prompts(args.prompts, args.seed)))
    elif args.out:
        folder = write_image_folder(args.out, generate(args.split, args.n, args.seed))
        print(f"wrote {args.n} {args.split} samples to {folder}")
    else:
        parser.error("give --out DIR (write a dataset) or --prompts N (print held-out captions)")


if __name__ == "__main__":
    main()
