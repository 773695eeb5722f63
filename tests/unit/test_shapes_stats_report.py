"""The shapes study's statistics (paired bootstrap) and pictures (the captioned comparison grid)."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from bench.shapes.report import SCALE, comparison_grid, markdown_table
from bench.shapes.stats import mean_ci, paired_ci


def test_mean_ci_brackets_the_mean_and_narrows_with_more_prompts():
    rng = np.random.default_rng(0)
    small = (rng.random((3, 50)) < 0.6).astype(float)
    large = (rng.random((3, 2000)) < 0.6).astype(float)
    for values in (small, large):
        mean, low, high = mean_ci(values)
        assert low <= mean <= high
    assert (mean_ci(large)[2] - mean_ci(large)[1]) < (mean_ci(small)[2] - mean_ci(small)[1]) / 3
    assert mean_ci(large)[1] < 0.6 < mean_ci(large)[2]


def test_paired_ci_detects_a_real_difference_and_not_a_null_one():
    rng = np.random.default_rng(1)
    a = (rng.random((3, 400)) < 0.7).astype(float)
    b = (rng.random((3, 400)) < 0.5).astype(float)
    diff, low, high = paired_ci(a, b)
    assert 0 < low < diff < high and low < 0.2 < high
    same = paired_ci(a, a)
    assert same == (0.0, 0.0, 0.0)
    noise = paired_ci(a, (rng.random((3, 400)) < 0.7).astype(float))
    assert noise[1] < 0 < noise[2]


def test_paired_ci_counts_seed_to_seed_variation():
    """Two seeds that disagree widely must widen the interval beyond the prompt-only one."""
    prompts = np.tile(np.array([1.0, 0.0] * 100), (1, 1))
    one_seed = mean_ci(prompts)
    seeds = np.stack([np.ones(200), np.zeros(200)])
    two = mean_ci(seeds)
    assert (two[2] - two[1]) > (one_seed[2] - one_seed[1])
    # paired: the same holds for a difference between two arms whose seeds disagree
    paired_two, paired_one = paired_ci(seeds, np.full_like(seeds, 0.5)), paired_ci(prompts, np.full_like(prompts, 0.5))
    assert (paired_two[2] - paired_two[1]) > (paired_one[2] - paired_one[1])


def test_paired_ci_refuses_unpaired_shapes():
    with pytest.raises(ValueError, match="same \\[seeds, prompts\\] shape"):
        paired_ci(np.zeros((3, 10)), np.zeros((2, 10)))


def test_comparison_grid_puts_columns_side_by_side_with_exact_pixels(tmp_path):
    n = 5
    red = np.zeros((n, 64, 64, 3), np.uint8)
    red[..., 0] = 200
    blue = np.zeros((n, 64, 64, 3), np.uint8)
    blue[..., 2] = 200
    path = comparison_grid(tmp_path / "grid.png", [f"prompt {i}" for i in range(n)], {"teacher": red, "adapter": blue},
                           per_row=2)
    image = np.asarray(Image.open(path).convert("RGB"))
    assert image.shape[1] > 2 * 2 * 64 * SCALE  # two cells of two images per row
    colours = {tuple(p) for p in image.reshape(-1, 3)}
    assert (200, 0, 0) in colours and (0, 0, 200) in colours
    # every pixel of every image drawn, unblended: n tiles of (64 * SCALE)^2 pixels per column
    for colour in ((200, 0, 0), (0, 0, 200)):
        assert (image == colour).all(-1).sum() == n * (64 * SCALE) ** 2


def test_markdown_table_formats_floats():
    table = markdown_table(["a", "b"], [["x", 0.12345], ["y", 2]])
    assert table.splitlines() == ["| a | b |", "|---|---|", "| x | 0.123 |", "| y | 2 |"]
