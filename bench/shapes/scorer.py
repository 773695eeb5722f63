"""The exact, detector-free alignment scorer of the shapes benchmark (GenEval's rules, without a detector).

Detection, in four exact steps:
1. snap every pixel to the nearest palette colour (or to the background when it is far from all of them);
2. split each colour's pixels into 8-connected regions (scipy.ndimage.label); drop specks under MIN_AREA;
3. classify each region's shape by which ideal shape, drawn in the region's own bounding box with the
   renderer's `shape_mask`, overlaps it best (IoU); a region that matches none well (IoU < MIN_MATCH),
   or whose box is far from square (a line fills its own thin box perfectly), is clutter, not an object.
   Fill ratios separate the shapes widely: square 1, circle pi/4, triangle 1/2;
4. size = small/large by the bounding box's longer side; position = the grid cell of the box centre.

On true renders this is exact (100% in `python -m bench.shapes.scorer_accuracy`). It stays exact
under a radius-1 Gaussian blur, sigma-15 noise and a 2x bilinear down/up round trip, and loses about
half a percent under sigma-30 noise. Beyond that, the 10 px triangles lose their apex and read as
circles (radius-1.5 blur), and a 4x down/up round trip (10 px shapes become 2.5 px) destroys shape
information. Colours and object counts survive all of these.

Scoring an image against a caption's `SceneSpec` gives named checks (per-attribute accuracies, GenEval
style) and `overall`:
    colour, shape  every described object's colour / shape occurs
    binding        every described colour-shape pair occurs on one object
    size, position the described object (same colour and shape) has that size / lies in that cell
    count          exactly N objects of the described colour and shape ("count" captions)
    relation       a described pair stands in the relation (GenEval's `relative_position` rule)
    no_extra       the image shows exactly as many objects as the caption describes
    overall        all of the above, on one consistent assignment: each described object is matched
                   with all its attributes, exactly `count` times, and nothing else is in the image
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from .captions import GRID, SHAPES, ObjectSpec, SceneSpec, parse_caption
from .scenes import BACKGROUND, CELL, IMAGE_SIZE, PALETTE, SIZE_PX, shape_mask

MIN_AREA = 20  # px; the smallest object (a 10 px triangle) has 55
MIN_MATCH = 0.6  # IoU with the best ideal shape; circle vs square is 0.79, triangle vs the others <= 0.57
MAX_ASPECT = 2.0  # every shape is drawn in a square box; a region twice as long as wide is none of them
SIZE_THRESHOLD = (SIZE_PX["small"] + SIZE_PX["large"]) / 2  # longer box side at or above this: "large"
MAX_SNAP_DISTANCE = 100.0  # RGB distance beyond which a pixel is background, whatever is nearest
POSITION_THRESHOLD = 0.1  # GenEval's margin, as a fraction of the two boxes' summed dimensions

_COLOURS = tuple(PALETTE)
_PALETTE = np.array([BACKGROUND, *PALETTE.values()], np.float32)  # index 0 = background


@dataclass(frozen=True)
class Detection:
    colour: str
    shape: str
    size: str
    cell: tuple[int, int]  # (row, col)
    center: tuple[float, float]  # (x, y) of the bounding box centre, px
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive)
    area: int
    match: float  # IoU with the ideal shape


def snap_to_palette(image: np.ndarray) -> np.ndarray:
    """Per-pixel palette index: 0 = background, k = k-th colour of PALETTE."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an RGB uint8 image [H, W, 3], got {image.dtype} {image.shape}; "
                         f"convert with np.asarray(pil_image.convert('RGB'))")
    distance = np.linalg.norm(image[:, :, None, :].astype(np.float32) - _PALETTE, axis=-1)
    labels = distance.argmin(-1)
    labels[distance.min(-1) > MAX_SNAP_DISTANCE] = 0
    return labels


def _classify(region: np.ndarray) -> tuple[str, float]:
    """(best shape, its IoU) for a region mask cropped to its bounding box."""
    ious = {}
    for shape in SHAPES:
        ideal = shape_mask(shape, *region.shape)
        ious[shape] = (region & ideal).sum() / (region | ideal).sum()
    best = max(ious, key=ious.get)
    return best, float(ious[best])


def detect(image: np.ndarray) -> list[Detection]:
    """The objects in an image (any size; positions are judged on the benchmark's grid after resizing)."""
    labels = snap_to_palette(image)
    scale = IMAGE_SIZE / labels.shape[1], IMAGE_SIZE / labels.shape[0]  # other resolutions: judge in 64x64 units
    detections = []
    eight_connected = np.ones((3, 3), bool)
    for index, colour in enumerate(_COLOURS, start=1):
        regions, _ = ndimage.label(labels == index, structure=eight_connected)
        for number, box in enumerate(ndimage.find_objects(regions), start=1):
            region = regions[box] == number
            area = int(region.sum())
            if area * scale[0] * scale[1] < MIN_AREA:
                continue
            y0, y1, x0, x1 = box[0].start, box[0].stop, box[1].start, box[1].stop
            if max(x1 - x0, y1 - y0) > MAX_ASPECT * min(x1 - x0, y1 - y0):
                continue
            shape, match = _classify(region)
            if match < MIN_MATCH:
                continue
            cx, cy = (x0 + x1) / 2 * scale[0], (y0 + y1) / 2 * scale[1]
            size = "large" if max((x1 - x0) * scale[0], (y1 - y0) * scale[1]) >= SIZE_THRESHOLD else "small"
            cell = (min(int(cy // CELL), GRID - 1), min(int(cx // CELL), GRID - 1))
            detections.append(Detection(colour, shape, size, cell, (cx, cy), (x0, y0, x1, y1), area, match))
    return detections


def relations_between(a: Detection, b: Detection) -> set[str]:
    """Where a is relative to b, by GenEval's rule (evaluation/evaluate_images.py, `relative_position`):
    the centre offset, shrunk by POSITION_THRESHOLD of the summed box sizes, must point mostly along an axis."""
    dims = np.array([a.box[2] - a.box[0] + b.box[2] - b.box[0], a.box[3] - a.box[1] + b.box[3] - b.box[1]], float)
    offset = np.subtract(a.center, b.center)
    revised = np.maximum(np.abs(offset) - POSITION_THRESHOLD * dims, 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    found = set()
    if dx < -0.5:
        found.add("left of")
    if dx > 0.5:
        found.add("right of")
    if dy < -0.5:
        found.add("above")
    if dy > 0.5:
        found.add("below")
    return found


def _matches(obj: ObjectSpec, d: Detection, attributes=("colour", "shape", "size", "position")) -> bool:
    """Whether detection d has every listed attribute the caption states for obj."""
    wanted = {"colour": obj.colour, "shape": obj.shape, "size": obj.size, "position": obj.position}
    got = {"colour": d.colour, "shape": d.shape, "size": d.size, "position": d.cell}
    return all(wanted[a] is None or wanted[a] == got[a] for a in attributes)


@dataclass(frozen=True)
class SceneScore:
    checks: dict[str, bool]  # the checks that apply to this spec (see the module docstring)
    detections: list[Detection] = field(repr=False)

    @property
    def overall(self) -> bool:
        return self.checks["overall"]


def score(image: np.ndarray, spec: SceneSpec | str) -> SceneScore:
    """Score an image against a caption (or its parsed spec)."""
    if isinstance(spec, str):
        spec = parse_caption(spec)
    dets = detect(image)
    objs = spec.objects
    checks = {
        "colour": all(any(d.colour == o.colour for d in dets) for o in objs),
        "shape": all(any(d.shape == o.shape for d in dets) for o in objs),
        "binding": all(any(_matches(o, d, ("colour", "shape")) for d in dets) for o in objs),
        "no_extra": len(dets) == spec.num_objects,
    }
    for attribute in ("size", "position"):
        if any(getattr(o, attribute) is not None for o in objs):
            checks[attribute] = all(any(_matches(o, d, ("colour", "shape", attribute)) for d in dets) for o in objs)
    if spec.kind == "count":
        checks["count"] = all(sum(_matches(o, d, ("colour", "shape")) for d in dets) == o.count for o in objs)
    full = [[d for d in dets if _matches(o, d)] for o in objs]  # detections matching everything stated
    if spec.relation is not None:
        checks["relation"] = any(spec.relation in relations_between(a, b) for a in full[0] for b in full[1])
    # objects of a spec always differ in colour or shape, so one detection never matches two of them
    exact = all(len(m) == o.count for o, m in zip(objs, full))
    checks["overall"] = exact and all(checks.values())
    return SceneScore(checks, dets)


def summarize(scores: list[SceneScore]) -> dict[str, float]:
    """Accuracy of each check over the scores it applies to, plus "n" (the number of images)."""
    names = sorted({name for s in scores for name in s.checks}, key=lambda n: (n == "overall", n))
    summary = {"n": float(len(scores))}
    for name in names:
        applicable = [s.checks[name] for s in scores if name in s.checks]
        summary[name] = float(np.mean(applicable))
    return summary


__all__ = ["Detection", "SceneScore", "detect", "relations_between", "score", "snap_to_palette", "summarize"]
