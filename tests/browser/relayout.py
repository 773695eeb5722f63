"""Lay out a shipped workflow with the node sizes ComfyUI's frontend really draws (a maintainer's tool).

    PYTHONPATH=tests:. .venv/bin/python -m browser.relayout workflows/sd15_adapter.json [...]

Starts a test ComfyUI with the pack, opens each file in headless Chromium, reads the height every node
needs at the width chosen below, and rewrites the file: nodes in columns by their depth in the graph
(notes first), stacked with a gap; a graph too long for one row at a readable zoom wraps into two rows
(a column may split in two or three); a UUID id derived from the file name (the frontend's schema wants
a UUID), a saved view (offset and scale) that shows the whole graph in a 1600x1000 window, and <name>.jpg,
the picture the template browser shows for it.
The browser test (test_frontend.py) checks the result: no overlaps, everything in view, readable zoom.
"""
from __future__ import annotations

import itertools
import json
import sys
import uuid
from pathlib import Path

from browser import frontend

WIDTHS = {"Note": 420, "MarkdownNote": 420, "LLMDiffLoadAdapter": 420, "LLMDiffTextEncode": 420, "LLMDiffEnhancePrompt": 420, "PreviewAny": 420,
          "SaveImage": 420, "KSampler": 320, "KSamplerAdvanced": 320, "VAEDecode": 200}
DEFAULT_WIDTH = 340  # loaders; the adapter loader is wider: its file names are long (qwen2.5-1.5b-sd15-timestep...)
FIXED_HEIGHTS = {"PreviewAny": 220, "SaveImage": 440}
FIRST_COLUMN = {"LLMDiffLoadLLM", "LLMDiffLoadAdapter", "UNETLoader", "CheckpointLoaderSimple", "VAELoader"}
# Stacked under their source instead of a column of their own, so the graph stays narrow enough to read.
BELOW_SOURCE = {"VAEDecode", "ConditioningCombine"}
GAP_X, GAP_Y, TITLE = 60, 40, 30
ROW_GAP = 80  # between the two rows of a wrapped graph: wider than GAP_Y so the rows read as two bands
# The part of a 1600x1000 window where the canvas is not covered: the side bar (left), the tab bar and the
# Run toolbar (top), the canvas info the frontend draws in the bottom-left corner (bottom) and the minimap
# with its toolbar in the bottom-right corner (MINIMAP: its top-left corner; measured in frontend 1.32.9).
# The saved view puts the whole graph inside it.
WINDOW, LEFT, TOP, RIGHT, BOTTOM = (1600, 1000), 60, 140, 1580, 900
MINIMAP = (1340, 740)
MARGIN = 20
# Frontend 1.32.9 draws nodes without text below LiteGraph.Canvas.MinFontSizeForLOD (8 px) over its 14 px node
# text size, a scale of 0.57; a saved view at least this large opens readable.
MIN_SCALE = 0.6


def hidden(left: float, top: float, right: float, bottom: float, margin: float = 0) -> bool:
    """Whether a rectangle in window pixels is (partly) outside the free part of the window."""
    if left < LEFT + margin or top < TOP + margin or right > RIGHT - margin or bottom > BOTTOM - margin:
        return True
    return right > MINIMAP[0] - margin and bottom > MINIMAP[1] - margin


NAMESPACE = uuid.UUID("6c1f3a52-45d8-4a3e-9a8e-2f4f0b6e7d10")


def workflow_id(path: Path) -> str:
    """A fixed UUID per shipped file, so relaying out never changes it."""
    return str(uuid.uuid5(NAMESPACE, path.stem))


def _depths(ui: dict) -> dict[int, int]:
    sources: dict[int, set[int]] = {n["id"]: set() for n in ui["nodes"]}
    for link in ui["links"]:
        _, origin, _, target, _, _ = link[:6]
        sources[target].add(origin)
    types = {n["id"]: n["type"] for n in ui["nodes"]}
    depth: dict[int, int] = {}

    def visit(node: int) -> int:
        if node not in depth:
            depth[node] = 0
            step = 0 if types[node] in BELOW_SOURCE else 1
            depth[node] = step + max((visit(s) for s in sources[node]), default=-1)
        return depth[node]

    for node in sources:
        visit(node)
    # A loader that feeds only later stages (a ControlNet, an empty latent) goes in the column just before
    # its first consumer instead of the first column, which would otherwise grow taller than the window.
    consumers: dict[int, list[int]] = {n: [] for n in sources}
    for target, origins in sources.items():
        for origin in origins:
            consumers[origin].append(target)
    for node, used_by in consumers.items():
        if not sources[node] and used_by and types[node] not in FIRST_COLUMN:
            depth[node] = max(depth[node], min(depth[t] for t in used_by) - 1)
    return depth


def _note_height(text: str, width: int) -> int:
    chars = max(20, (width - 20) // 7)
    lines = sum(max(1, -(-len(line) // chars)) for line in text.split("\n"))
    return 30 + lines * 17


def _columns(ui: dict, heights: dict[int, float]) -> list[list[list[dict]]]:
    """Set every node's size; return the columns by depth, each a list of units: a node with the nodes stacked
    under it (BELOW_SOURCE), which stay together when a column splits."""
    row = _rows(ui["nodes"])  # with the sizes saved with the positions
    depth = _depths(ui)
    notes = [n for n in ui["nodes"] if n["type"] in ("Note", "MarkdownNote")]
    for n in ui["nodes"]:
        depth[n["id"]] = 0 if n in notes else depth[n["id"]] + 1
        w = WIDTHS.get(n["type"], DEFAULT_WIDTH)
        h = FIXED_HEIGHTS.get(n["type"]) or (_note_height(n["widgets_values"][0], w) if n in notes else heights[n["id"]])
        n["size"] = [w, int(round(h))]
    sources: dict[int, set[int]] = {}
    for link in ui["links"]:
        sources.setdefault(link[3], set()).add(link[1])
    by_depth: dict[int, list[dict]] = {}
    # The saved reading order (row, then left to right, then top to bottom) is kept, so a hand-made order
    # survives and laying out a laid-out file changes nothing.
    for n in sorted(ui["nodes"], key=lambda n: (row[n["id"]], n["pos"][0], n["pos"][1], n["id"])):
        by_depth.setdefault(depth[n["id"]], []).append(n)
    columns = []
    for d in sorted(by_depth):
        units = [[n] for n in by_depth[d] if n["type"] not in BELOW_SOURCE]
        for n in by_depth[d]:
            if n["type"] in BELOW_SOURCE:
                unit = next((u for u in units if any(m["id"] in sources.get(n["id"], ()) for m in u)), None)
                if unit is None:
                    units.append([n])
                else:
                    unit.append(n)
        columns.append(units)
    return columns


def _rows(nodes: list[dict]) -> dict[int, int]:
    """The row of every node in a saved layout: a row ends where the next node down starts more than GAP_Y
    below every node above it (ROW_GAP separates the rows this tool makes)."""
    rows, row, bottom = {}, 0, None
    for n in sorted(nodes, key=lambda n: n["pos"][1]):
        top = n["pos"][1] - TITLE
        if bottom is not None and top > bottom + GAP_Y:
            row += 1
        bottom = max(bottom if bottom is not None else top, n["pos"][1] + n["size"][1])
        rows[n["id"]] = row
    return rows


def _splits(units: list[list[dict]], parts: int):
    """Every way to cut a column's units, in order, into `parts` stacks."""
    for cuts in itertools.combinations(range(1, len(units)), parts - 1):
        bounds = (0, *cuts, len(units))
        yield [sum(units[a:b], []) for a, b in zip(bounds, bounds[1:])]


def _place(rows: list[list[list[dict]]]) -> None:
    """Rows of stacks, left to right; each stack's nodes top to bottom."""
    top = 0
    for row in rows:
        x, bottom = 0, top
        for stack in row:
            y, width = top, 0
            for n in stack:
                n["pos"] = [x, y + TITLE]
                y += TITLE + n["size"][1] + GAP_Y
                width = max(width, n["size"][0])
            bottom = max(bottom, y - GAP_Y)
            x += width + GAP_X
        top = bottom + ROW_GAP


def _fit(ui: dict) -> tuple[float, list[float]]:
    """The largest scale (two decimals, at most 1) at which the graph, its top-left corner at the free part's
    top-left corner, is all in the free part of the window, MARGIN inside; and the offset that puts it there."""
    rects = [(n["pos"][0], n["pos"][1] - TITLE, n["pos"][0] + n["size"][0], n["pos"][1] + n["size"][1]) for n in ui["nodes"]]
    min_x, min_y = min(r[0] for r in rects), min(r[1] for r in rects)
    x0, y0 = LEFT + MARGIN, TOP + MARGIN
    for hundredths in range(100, 1, -1):
        scale = hundredths / 100
        if not any(hidden(x0 + (left - min_x) * scale, y0 + (top - min_y) * scale, x0 + (right - min_x) * scale,
                          y0 + (bottom - min_y) * scale, MARGIN) for left, top, right, bottom in rects):
            break
    return scale, [round(x0 / scale - min_x, 1), round(y0 / scale - min_y, 1)]


def layout(ui: dict, heights: dict[int, float]) -> None:
    """One row of columns when that opens at MIN_SCALE or more (the common, short graphs). Else the arrangement
    that opens at the largest scale among two rows, each column whole or split in two or three stacks, the
    rows wrapped between stacks (loaders and prompts on top, the later stages below); ties go to the fewest
    stacks, then to fuller stacks on the left."""
    columns = _columns(ui, heights)
    one_row = [[sum(units, []) for units in columns]]
    _place(one_row)
    best = (_fit(ui)[0], len(columns), one_row)
    if best[0] < MIN_SCALE:
        options = [[s for parts in range(1, min(3, len(units)) + 1) for s in reversed(list(_splits(units, parts)))]
                   for units in columns]
        for choice in itertools.product(*options):
            stacks = [s for col in choice for s in col]
            for wrap in range(1, len(stacks)):
                rows = [stacks[:wrap], stacks[wrap:]]
                _place(rows)
                scale = _fit(ui)[0]
                if scale > best[0] or (scale == best[0] and len(stacks) < best[1]):
                    best = (scale, len(stacks), rows)
    _place(best[2])
    scale, offset = _fit(ui)
    ui.setdefault("extra", {})["ds"] = {"scale": scale, "offset": offset}


def measure(page, path: Path, ui: dict) -> dict[int, float]:
    frontend.load_file(page, path)
    widths = {n["id"]: WIDTHS.get(n["type"], DEFAULT_WIDTH) for n in ui["nodes"]}
    return {int(k): v for k, v in page.evaluate(
        """(widths) => Object.fromEntries(app.graph._nodes.map(n => { n.size[0] = widths[n.id]; return [n.id, n.computeSize()[1]]; }))""",
        {str(k): v for k, v in widths.items()}).items()}


def thumbnail(page, path: Path, ui: dict) -> None:
    """<name>.jpg beside the workflow: what the template browser shows on the card (its only text there is the
    file name, so the picture carries a readable title) over the graph at its saved view."""
    import io

    from PIL import Image, ImageDraw, ImageFont

    frontend.load_file(page, path)
    scale, (ox, oy) = ui["extra"]["ds"]["scale"], ui["extra"]["ds"]["offset"]
    corners = [(n["pos"][0], n["pos"][1] - TITLE, n["pos"][0] + n["size"][0], n["pos"][1] + n["size"][1]) for n in ui["nodes"]]
    box = (int((min(c[0] for c in corners) + ox) * scale) - MARGIN, int((min(c[1] for c in corners) + oy) * scale) - MARGIN,
           int((max(c[2] for c in corners) + ox) * scale) + MARGIN, int((max(c[3] for c in corners) + oy) * scale) + MARGIN)
    shot = Image.open(io.BytesIO(page.screenshot())).convert("RGB").crop(box)
    side, banner = 512, 96  # the template browser's cards are square
    shot.thumbnail((side, side - banner))
    image = Image.new("RGB", (side, side), (24, 24, 24))
    image.paste(shot, ((side - shot.width) // 2, banner + (side - banner - shot.height) // 2))
    draw = ImageDraw.Draw(image)
    try:
        font = ImageFont.truetype("DejaVuSans-Bold.ttf", 26)
    except OSError:
        font = ImageFont.load_default()
    title = TITLES.get(path.stem, path.stem)
    lines, line = [], ""
    for word in title.split():
        trial = f"{line} {word}".strip()
        if line and draw.textlength(trial, font=font) > side - 32:
            lines.append(line)
            trial = word
        line = trial
    lines.append(line)
    draw.multiline_text((16, 14), "\n".join(lines[:2]), fill=(240, 240, 240), font=font, spacing=8)
    image.save(path.with_suffix(".jpg"), quality=85)


TITLES = {
    "sd15_adapter": "SD1.5 + LLM Diff Adapter (UNet, VAE files)",
    "sd15_adapter_checkpoint": "SD1.5 + LLM Diff Adapter (checkpoint)",
    "sd15_adapter_clip_concat": "SD1.5 + LLM Diff Adapter + CLIP tokens",
    "sd15_adapter_controlnet_area": "SD1.5 + LLM Diff Adapter: area + ControlNet",
    "sd15_adapter_timestep_aware": "SD1.5 + timestep-aware LLM Diff Adapter",
    "sd2_adapter": "SD2 (768-v) + LLM Diff Adapter",
    "sdxl_adapter": "SDXL + LLM Diff Adapter (UNet, VAE files)",
    "sdxl_adapter_checkpoint": "SDXL + LLM Diff Adapter (checkpoint)",
    "sd15_ella": "SD1.5 + ELLA (published adapter, T5 encoder)",
    "sdxl_rouwei_gemma": "SDXL + RouWei-Gemma (published adapter)",
}


def main(paths: list[str]) -> None:
    from devkit.comfyui import ComfyServer

    with ComfyServer("relayout") as server, frontend.browser() as context:
        page = frontend.open_frontend(context, server.url)
        # The thumbnails show the graph alone: the minimap would cover a corner of a graph wrapped into two rows.
        page.add_style_tag(content=".minimap-main-container { display: none !important; }")
        for name in paths:
            path = Path(name)
            ui = json.loads(path.read_text(encoding="utf-8"))
            ui["id"] = workflow_id(path)
            heights = measure(page, path, ui)
            layout(ui, heights)
            path.write_text(json.dumps(ui, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
            thumbnail(page, path, ui)
            print(f"{path}: {len(ui['nodes'])} nodes, view {ui['extra']['ds']}")


if __name__ == "__main__":
    main(sys.argv[1:])
