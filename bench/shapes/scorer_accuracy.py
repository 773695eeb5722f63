"""How far the shapes scorer can be trusted: its accuracy on true renders, on degraded renders, and a negative control.

Every image is scored against its own caption (true, blurred, noisy, down-and-up-sampled like a
coarse VAE round trip), then against another image's caption (the negative control: a scorer that
says "yes" to anything would score high there). Prints a Markdown table of per-check accuracies.

    python -m bench.shapes.scorer_accuracy --n 500 --seed 0 [--out scorer_accuracy.md]

Half the images come from the train split and half from the held-out split.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageFilter

from .scenes import IMAGE_SIZE, Sample, generate
from .scorer import score, summarize


def _blur(radius: float) -> Callable:
    return lambda image, rng: np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(radius)))


def _noise(sigma: float) -> Callable:
    return lambda image, rng: np.clip(image + rng.normal(0.0, sigma, image.shape), 0, 255).astype(np.uint8)


def _down_up(factor: int) -> Callable:
    small = IMAGE_SIZE // factor
    return lambda image, rng: np.asarray(
        Image.fromarray(image).resize((small, small), Image.BILINEAR).resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR))


CORRUPTIONS: dict[str, Callable[[np.ndarray, np.random.Generator], np.ndarray]] = {
    "true renders": lambda image, rng: image,
    "gaussian blur, radius 1": _blur(1.0),
    "gaussian blur, radius 1.5": _blur(1.5),
    "gaussian noise, sigma 15": _noise(15.0),
    "gaussian noise, sigma 30": _noise(30.0),
    "bilinear down/up, 2x": _down_up(2),
    "bilinear down/up, 4x": _down_up(4),
}
CHECKS = ("overall", "colour", "shape", "binding", "size", "position", "count", "relation", "no_extra")


def evaluate(samples: list[Sample], corruption: str = "true renders", shuffle: bool = False,
             seed: int = 0) -> dict[str, float]:
    """Summary of scoring each (corrupted) image against its caption, or against another sample's if shuffle."""
    rng = np.random.default_rng(seed)
    specs = [s.spec for s in samples]
    if shuffle:  # a random cyclic shift of a random order: no image keeps its own caption
        order = rng.permutation(len(samples))
        shifted = np.roll(order, 1)
        specs = [None] * len(samples)
        for i, j in zip(order, shifted):
            specs[i] = samples[j].spec
    corrupt = CORRUPTIONS[corruption]
    return summarize([score(corrupt(s.image, rng), spec) for s, spec in zip(samples, specs)])


def accuracy_table(n: int = 500, seed: int = 0) -> str:
    """The Markdown table of the scorer's accuracy (n images, half train and half held-out)."""
    samples = generate("train", n - n // 2, seed) + generate("heldout", n // 2, seed)
    rows = [(name, evaluate(samples, name, seed=seed)) for name in CORRUPTIONS]
    rows.append(("negative control: true renders vs shuffled captions", evaluate(samples, shuffle=True, seed=seed)))
    lines = ["| images scored against | " + " | ".join(CHECKS) + " |", "|---" * (len(CHECKS) + 1) + "|"]
    for name, summary in rows:
        cells = [f"{100 * summary[c]:.1f}%" if c in summary else "n/a" for c in CHECKS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Accuracy of the shapes scorer (Markdown table).",
                                     prog="python -m bench.shapes.scorer_accuracy")
    parser.add_argument("--n", type=int, default=500, help="images (half train, half held-out)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="also write the table to this file")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    table = accuracy_table(args.n, args.seed)
    text = (f"Shapes scorer accuracy, {args.n} images, seed {args.seed} "
            f"(`python -m bench.shapes.scorer_accuracy --n {args.n} --seed {args.seed}`):\n\n{table}\n")
    print(text)
    print(f"({time.perf_counter() - start:.1f} s)")
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
