"""Lay out a shipped workflow with the node sizes ComfyUI's frontend really draws (a maintainer's tool).

    PYTHONPATH=tests .venv/bin/python -m browser.relayout workflows/sd15_adapter.json [...]

Starts a test ComfyUI with the pack, opens each file in headless Chromium, reads the height every node
needs at the width chosen below, and rewrites the file: nodes in columns by their depth in the graph
(notes first), stacked with a gap, a UUID id derived from the file name (the frontend's schema wants a
UUID), a saved view (offset and scale) that shows the whole graph in a 1600x1000 window, and <name>.jpg,
the picture the template browser shows for it.
The browser test (test_frontend.py) checks the result: no overlaps, everything in view.
"""
from __future__ import annotations

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
# The part of a 1600x1000 window where the canvas is not covered: by the side bar (left), the tab bar and the
# Run toolbar (top) and the minimap (bottom right). The saved view puts the whole graph inside it.
WINDOW, LEFT, TOP, RIGHT, BOTTOM = (1600, 1000), 60, 140, 1580, 730
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


def layout(ui: dict, heights: dict[int, float]) -> None:
    depth = _depths(ui)
    notes = [n for n in ui["nodes"] if n["type"] in ("Note", "MarkdownNote")]
    for n in ui["nodes"]:
        depth[n["id"]] = 0 if n in notes else depth[n["id"]] + 1
    columns: dict[int, list[dict]] = {}
    for n in sorted(ui["nodes"], key=lambda n: (n["type"] in BELOW_SOURCE, n["pos"][1], n["id"])):
        columns.setdefault(depth[n["id"]], []).append(n)
    x = 0
    for col in sorted(columns):
        width = 0
        y = 0
        for n in columns[col]:
            w = WIDTHS.get(n["type"], DEFAULT_WIDTH)
            h = FIXED_HEIGHTS.get(n["type"]) or (_note_height(n["widgets_values"][0], w) if n in notes else heights[n["id"]])
            n["pos"], n["size"] = [x, y + TITLE], [w, int(round(h))]
            y += TITLE + n["size"][1] + GAP_Y
            width = max(width, w)
        x += width + GAP_X
    min_x = min(n["pos"][0] for n in ui["nodes"])
    min_y = min(n["pos"][1] - TITLE for n in ui["nodes"])
    max_x = max(n["pos"][0] + n["size"][0] for n in ui["nodes"])
    max_y = max(n["pos"][1] + n["size"][1] for n in ui["nodes"])
    margin = 20
    scale = min(1.0, (RIGHT - LEFT - 2 * margin) / (max_x - min_x), (BOTTOM - TOP - 2 * margin) / (max_y - min_y))
    scale = int(scale * 100) / 100
    offset = [(LEFT + margin) / scale - min_x, (TOP + margin) / scale - min_y]
    ui.setdefault("extra", {})["ds"] = {"scale": scale, "offset": [round(offset[0], 1), round(offset[1], 1)]}


def measure(page, path: Path, ui: dict) -> dict[int, float]:
    frontend.load_file(page, path)
    widths = {n["id"]: WIDTHS.get(n["type"], DEFAULT_WIDTH) for n in ui["nodes"]}
    return {int(k): v for k, v in page.evaluate(
        """(widths) => Object.fromEntries(app.graph._nodes.map(n => { n.size[0] = widths[n.id]; return [n.id, n.computeSize()[1]]; }))""",
        {str(k): v for k, v in widths.items()}).items()}


def thumbnail(page, path: Path) -> None:
    """<name>.jpg beside the workflow: what the template browser shows on the card (its only text there is the
    file name, so the picture carries a readable title)."""
    import io

    from PIL import Image, ImageDraw, ImageFont

    frontend.load_file(page, path)
    shot = Image.open(io.BytesIO(page.screenshot())).convert("RGB").crop((LEFT, TOP, RIGHT, BOTTOM))
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
        for name in paths:
            path = Path(name)
            ui = json.loads(path.read_text(encoding="utf-8"))
            ui["id"] = workflow_id(path)
            heights = measure(page, path, ui)
            layout(ui, heights)
            path.write_text(json.dumps(ui, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
            thumbnail(page, path)
            print(f"{path}: {len(ui['nodes'])} nodes, view {ui['extra']['ds']}")


if __name__ == "__main__":
    main(sys.argv[1:])
