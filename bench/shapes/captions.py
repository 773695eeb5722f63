"""The caption grammar of the shapes benchmark: what a caption asserts, how it is worded, how it parses back.

A `SceneSpec` is exactly what a caption claims about its image, no more: a "two red circles" caption
says nothing about sizes or places, so its spec has none, and the scorer checks none. Captions are
drawn from several phrasings per scene kind (so the LM must learn meaning, not one template), and
`parse_caption` inverts every phrasing back to the same spec. That round trip is what lets any caption
(a held-out prompt, a line in a .txt file) be scored without a side channel.

Scene kinds, in GenEval's terms:
    single    one object, with colour, shape, size and grid position    "a small red circle in the top left"
    pair      two different objects (attribute binding)                 "a red circle and a blue square"
    count     2 or 3 identical objects                                  "three green triangles"
    relation  two different objects and a spatial relation              "a red circle to the left of a blue square"

The words here are the vocabulary; what they look like in pixels (RGB values, sizes, the grid) lives
in `scenes.py`.
"""
from __future__ import annotations

import re
import string
from dataclasses import dataclass

import numpy as np

COLOURS = ("red", "green", "blue", "yellow", "purple", "white")
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")
RELATIONS = ("left of", "right of", "above", "below")
KINDS = ("single", "pair", "count", "relation")
COUNTS = (2, 3)  # objects in a "count" scene; one object is a "single" scene
GRID = 3  # positions are cells of a GRID x GRID grid, (row, col) with (0, 0) at the top left

# (row, col) -> the words for that cell.
POSITIONS: dict[tuple[int, int], str] = {
    (0, 0): "top left", (0, 1): "top middle", (0, 2): "top right",
    (1, 0): "middle left", (1, 1): "center", (1, 2): "middle right",
    (2, 0): "bottom left", (2, 1): "bottom middle", (2, 2): "bottom right",
}

# Synonyms give the LM several surface forms per concept; the first word is the canonical one.
SIZE_WORDS = {"small": ("small", "little"), "large": ("large", "big")}
RELATION_WORDS = {
    "left of": ("left of", "to the left of"),
    "right of": ("right of", "to the right of"),
    "above": ("above", "over"),
    "below": ("below", "under", "beneath"),
}
COUNT_WORDS = {2: ("two", "2"), 3: ("three", "3")}

# Phrasings per kind. Slots: {size} {colour} {shape} {pos} {count} {colour1} {shape1} {rel} {colour2} {shape2}.
# The article is written "a" because every word that can follow it starts with a consonant (checked below).
TEMPLATES: dict[str, tuple[str, ...]] = {
    "single": (
        "a {size} {colour} {shape} in the {pos}",
        "a {size} {colour} {shape} at the {pos} of the image",
        "there is a {size} {colour} {shape} in the {pos}",
        "in the {pos}, a {size} {colour} {shape}",
    ),
    "pair": (
        "a {colour1} {shape1} and a {colour2} {shape2}",
        "one {colour1} {shape1} and one {colour2} {shape2}",
        "a {colour1} {shape1} together with a {colour2} {shape2}",
        "an image with a {colour1} {shape1} and a {colour2} {shape2}",
    ),
    "count": (
        "{count} {colour} {shape}s",
        "exactly {count} {colour} {shape}s",
        "a picture of {count} {colour} {shape}s",
        "there are {count} {colour} {shape}s",
    ),
    "relation": (
        "a {colour1} {shape1} {rel} a {colour2} {shape2}",
        "a {colour1} {shape1} is {rel} a {colour2} {shape2}",
        "a {colour1} {shape1} placed {rel} a {colour2} {shape2}",
    ),
}

assert all(w[0] not in "aeiou" for w in (*COLOURS, *(s for ws in SIZE_WORDS.values() for s in ws))), \
    "templates hard-code the article 'a'; a word starting with a vowel needs 'an'"


@dataclass(frozen=True)
class ObjectSpec:
    """One described object (or `count` identical ones). None = the caption does not say."""

    colour: str
    shape: str
    count: int = 1
    size: str | None = None
    position: tuple[int, int] | None = None  # (row, col) grid cell

    def __post_init__(self) -> None:
        _check("colour", self.colour, COLOURS)
        _check("shape", self.shape, SHAPES)
        _check("size", self.size, (*SIZES, None))
        _check("position", self.position, (*POSITIONS, None))
        if self.count not in (1, *COUNTS):
            raise ValueError(f"count must be 1 or one of {COUNTS}, got {self.count!r}")


@dataclass(frozen=True)
class SceneSpec:
    """Everything a caption asserts. `relation` (if any) reads: objects[0] <relation> objects[1]."""

    kind: str
    objects: tuple[ObjectSpec, ...]
    relation: str | None = None

    def __post_init__(self) -> None:
        _check("kind", self.kind, KINDS)
        _check("relation", self.relation, (*RELATIONS, None))
        n = len(self.objects)
        ok = {
            "single": n == 1 and self.objects[0].count == 1 and self.objects[0].size is not None
            and self.objects[0].position is not None and self.relation is None,
            "pair": n == 2 and self.relation is None,
            "count": n == 1 and self.objects[0].count in COUNTS and self.relation is None,
            "relation": n == 2 and self.relation is not None,
        }[self.kind]
        if not ok:
            raise ValueError(f"malformed {self.kind!r} scene spec: {self!r}; see the kinds in bench/shapes/captions.py")
        if n == 2 and len({(o.colour, o.shape) for o in self.objects}) == 1:
            raise ValueError(f"a {self.kind} scene needs two different objects, got {self.objects[0].colour} "
                             f"{self.objects[0].shape} twice")

    @property
    def num_objects(self) -> int:
        """How many objects an image of this spec shows."""
        return sum(o.count for o in self.objects)


def _check(what: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"unknown {what} {value!r}; choose one of {[c for c in choices if c is not None]}")


# --- caption rendering ---

def caption_for(spec: SceneSpec, rng: np.random.Generator, template: int | None = None) -> str:
    """A caption for `spec` in a random phrasing (or phrasing number `template` of its kind)."""
    templates = TEMPLATES[spec.kind]
    fmt = templates[rng.integers(len(templates)) if template is None else template]
    pick = lambda words: words[rng.integers(len(words))]  # noqa: E731
    slots: dict[str, str] = {}
    if spec.kind in ("single", "count"):
        (obj,) = spec.objects
        slots.update(colour=obj.colour, shape=obj.shape)
        if obj.count > 1:
            slots["count"] = pick(COUNT_WORDS[obj.count])
        if obj.size is not None:
            slots["size"] = pick(SIZE_WORDS[obj.size])
        if obj.position is not None:
            slots["pos"] = POSITIONS[obj.position]
    else:
        a, b = spec.objects
        slots.update(colour1=a.colour, shape1=a.shape, colour2=b.colour, shape2=b.shape)
        if spec.relation is not None:
            slots["rel"] = pick(RELATION_WORDS[spec.relation])
    return fmt.format(**slots)


# --- caption parsing: each template becomes one regular expression ---

def _inverse(table: dict) -> dict[str, object]:
    return {word: key for key, words in table.items() for word in words}


_SLOT_VALUES: dict[str, dict[str, object]] = {
    "size": _inverse(SIZE_WORDS),
    "colour": {c: c for c in COLOURS},
    "shape": {s: s for s in SHAPES},
    "pos": {name: cell for cell, name in POSITIONS.items()},
    "count": _inverse(COUNT_WORDS),
    "rel": _inverse(RELATION_WORDS),
}


def _slot_kind(slot: str) -> str:
    return slot.rstrip("12")


def _template_regex(fmt: str) -> re.Pattern:
    parts = []
    for literal, slot, _, _ in string.Formatter().parse(fmt):
        parts.append(re.escape(literal))
        if slot is not None:
            words = sorted(_SLOT_VALUES[_slot_kind(slot)], key=len, reverse=True)  # longest first: "to the left of"
            parts.append(f"(?P<{slot}>{'|'.join(map(re.escape, words))})")
    return re.compile("".join(parts))


_PARSERS = [(kind, _template_regex(fmt)) for kind, fmts in TEMPLATES.items() for fmt in fmts]


def _spec_from_match(kind: str, m: re.Match) -> SceneSpec:
    v = {slot: _SLOT_VALUES[_slot_kind(slot)][word] for slot, word in m.groupdict().items()}
    if kind in ("single", "count"):
        obj = ObjectSpec(v["colour"], v["shape"], count=v.get("count", 1), size=v.get("size"), position=v.get("pos"))
        return SceneSpec(kind, (obj,))
    objects = (ObjectSpec(v["colour1"], v["shape1"]), ObjectSpec(v["colour2"], v["shape2"]))
    return SceneSpec(kind, objects, relation=v.get("rel"))


def parse_caption(caption: str) -> SceneSpec:
    """The spec a caption asserts. Raises ValueError for text outside the grammar."""
    text = " ".join(caption.strip().lower().rstrip(".").split())
    specs = {_spec_from_match(kind, m) for kind, rx in _PARSERS if (m := rx.fullmatch(text))}
    if len(specs) == 1:
        return specs.pop()
    if not specs:
        raise ValueError(f"{caption!r} is not a shapes-benchmark caption; it must follow one of the phrasings in "
                         f"bench/shapes/captions.py TEMPLATES, e.g. 'a small red circle in the top left' or "
                         f"'two blue squares'")
    raise ValueError(f"{caption!r} is ambiguous in the shapes grammar (reads as {sorted(map(repr, specs))}); "
                     f"this is a bug in TEMPLATES")
