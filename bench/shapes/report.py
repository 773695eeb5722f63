"""Pictures and tables of the shapes benchmark: a captioned teacher-vs-adapter grid and Markdown tables."""
from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np

__all__ = ["comparison_grid", "markdown_table"]

SCALE = 3  # 64 px scenes are too small to look at: nearest-neighbour upscaling keeps pixels exact
CAPTION_LINES = 3


def comparison_grid(path: str | Path, prompts: list[str], columns: dict[str, np.ndarray], per_row: int = 4) -> Path:
    """One cell per prompt: the images of every column side by side (e.g. teacher | adapter), the caption under
    them, the column names over the first row. Images are uint8 [n, H, W, 3]."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    names = list(columns)
    h, w = next(iter(columns.values())).shape[1:3]
    h, w, gap, pad = h * SCALE, w * SCALE, 4, 12
    line_height = 12
    cell_w = len(names) * w + (len(names) - 1) * gap
    cell_h = h + CAPTION_LINES * line_height + 6
    chars = max(10, cell_w // 6)
    rows = -(-len(prompts) // per_row)
    canvas = Image.new("RGB", (per_row * (cell_w + pad) + pad, rows * (cell_h + pad) + pad + line_height + 4), "white")
    draw = ImageDraw.Draw(canvas)
    for i, prompt in enumerate(prompts):
        r, c = divmod(i, per_row)
        x0, y0 = pad + c * (cell_w + pad), pad + line_height + 4 + r * (cell_h + pad)
        for j, name in enumerate(names):
            x = x0 + j * (w + gap)
            if r == 0:
                draw.text((x, pad), name, fill="black", font=font)
            tile = Image.fromarray(columns[name][i]).resize((w, h), Image.NEAREST)
            canvas.paste(tile, (x, y0))
        for k, line in enumerate(textwrap.wrap(prompt, chars)[:CAPTION_LINES]):
            draw.text((x0, y0 + h + 3 + k * line_height), line, fill="black", font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def markdown_table(header: list[str], rows: list[list]) -> str:
    """A Markdown table; floats with 3 decimals."""
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
