"""Paired bootstrap confidence intervals for the shapes study.

Arms are compared on the same held-out prompts and the same seeds (the same initial noise per prompt,
the same adapter initialisation per seed), so differences are paired: resample prompts (and seeds)
with replacement, recompute the difference of means, and take percentiles (Efron's percentile
bootstrap). Resampling both levels keeps the seed-to-seed variation of training in the interval, not
just the prompt-to-prompt variation of sampling.

    low, high = paired_ci(a, b)            # a, b: [seeds, prompts] arrays of per-prompt results
"""
from __future__ import annotations

import numpy as np

__all__ = ["mean_ci", "paired_ci"]


def _resampled_means(values: np.ndarray, draws: int, rng: np.random.Generator) -> np.ndarray:
    """Means of `values` [seeds, prompts] over `draws` two-level bootstrap resamples."""
    values = np.atleast_2d(np.asarray(values, dtype=np.float64))
    seeds, prompts = values.shape
    seed_picks = rng.integers(seeds, size=(draws, seeds))
    prompt_picks = rng.integers(prompts, size=(draws, prompts))
    # mean over the picked seeds of the mean over the picked prompts (the same prompt picks for every seed,
    # because a prompt is one unit of the design across seeds)
    per_seed = values[:, prompt_picks].mean(axis=2)  # [seeds, draws]
    return np.take_along_axis(per_seed.T, seed_picks, axis=1).mean(axis=1)


def mean_ci(values, draws: int = 2000, level: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high) of per-prompt results [seeds, prompts]."""
    rng = np.random.default_rng(seed)
    means = _resampled_means(values, draws, rng)
    tail = (1 - level) / 2 * 100
    return float(np.mean(values)), float(np.percentile(means, tail)), float(np.percentile(means, 100 - tail))


def paired_ci(a, b, draws: int = 2000, level: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """(mean of a - b, low, high): a and b are [seeds, prompts] results of two arms on the same design."""
    a, b = np.atleast_2d(np.asarray(a, np.float64)), np.atleast_2d(np.asarray(b, np.float64))
    if a.shape != b.shape:
        raise ValueError(f"paired arms need the same [seeds, prompts] shape, got {a.shape} and {b.shape}")
    return mean_ci(a - b, draws, level, seed)
