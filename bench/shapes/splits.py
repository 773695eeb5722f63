"""The fixed train / held-out split of the shapes benchmark: combinations never seen together in training.

Compositional generalisation is the point of the benchmark, so the held-out split is defined by
*combinations*, not by samples:

- held-out colour-shape pairs: one pair per shape, each with a different colour (a Latin selection),
  so every colour and every shape still occurs in training, just never in these pairings. With the
  default seed, e.g. a "white triangle" never appears in a training caption, while white squares
  and red triangles do.
- held-out relations: one horizontal and one vertical (shape, relation, shape) configuration, together
  with its converse ("circle left of triangle" also holds out "triangle right of circle", which is
  the same picture), whatever the colours.

A caption belongs to the held-out split iff it asserts at least one held-out combination, and to the
train (and in-distribution val) split iff it asserts none. Held-out-ness is judged on what the caption
says; relation scenes put their two objects on one row or one column (see scenes.py), so a training
picture never shows a held-out relation along the other axis either.

Two designs ("holdouts") hold out the same combinations in different scenes:

- "pairings" (`HELDOUT`, the default): the held-out pairings are never drawn in training, not even
  alone. A held-out "a white triangle" then asks the UNet to draw something it never drew, which no
  text side can teach it; the split measures the UNet's generalisation as much as the text's.
- "scenes" (`HOLDOUTS["scenes"]`): every pairing is drawn in training as a one-pairing scene (single
  and count kinds), and only the two-object scenes (pair, relation) that use a held-out pairing or
  relation are held out. The UNet knows how to draw a white triangle; the held-out question is whether
  the context says which of two objects is white, which is the binding a text side is responsible for.

Assets record their holdout in the manifest (`bench.shapes.assets.holdout_of`), and everything that
draws train data or held-out prompts for a base takes it from there. `HELDOUT` (seed 0) is the split
every published number before the "scenes" design uses; `make_heldout(seed)` exists for robustness
studies only. `python -m bench.shapes.splits` prints both designs.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .captions import COLOURS, KINDS, SHAPES, SceneSpec

SPLITS = ("train", "val", "heldout")
ONE_PAIRING_KINDS = ("single", "count")  # scenes whose objects all share one colour-shape pairing
CONVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


@dataclass(frozen=True)
class HeldOut:
    """The combinations the held-out split is made of; none of them occurs in a train caption."""

    colour_shapes: frozenset[tuple[str, str]]  # (colour, shape)
    relations: frozenset[tuple[str, str, str]]  # (shape_a, relation, shape_b), closed under the converse
    drawn_alone: bool = False  # the "scenes" design: held-out pairings are trained on in one-pairing scenes

    @property
    def name(self) -> str:
        return "scenes" if self.drawn_alone else "pairings"

    def kinds(self, split: str) -> tuple[str, ...]:
        """The scene kinds `split` can hold: the "scenes" design holds out two-object scenes only."""
        return tuple(k for k in KINDS if not (split == "heldout" and self.drawn_alone and k in ONE_PAIRING_KINDS))

    def combinations_in(self, spec: SceneSpec) -> list[str]:
        """The held-out combinations `spec` asserts, in words (empty for a train caption)."""
        drawn_alone = self.drawn_alone and spec.kind in ONE_PAIRING_KINDS  # a training scene in this design
        found = [] if drawn_alone else [f"{o.colour} {o.shape}" for o in spec.objects
                                        if (o.colour, o.shape) in self.colour_shapes]
        if spec.relation is not None:
            a, b = spec.objects
            if (a.shape, spec.relation, b.shape) in self.relations:
                found.append(f"{a.shape} {spec.relation} {b.shape}")
        return found


def make_heldout(seed: int = 0, drawn_alone: bool = False) -> HeldOut:
    """Draw the held-out combinations from `seed` (deterministic; see the module docstring); `drawn_alone` gives
    the "scenes" design of the same combinations."""
    rng = np.random.default_rng(seed)
    colours = rng.permutation(COLOURS)
    shapes = rng.permutation(SHAPES)
    colour_shapes = frozenset((str(c), str(s)) for c, s in zip(colours, shapes))
    relations = set()
    for relation in ("left of", "above"):  # one horizontal and one vertical configuration
        a, b = rng.choice(SHAPES, size=2, replace=False)
        relations |= {(str(a), relation, str(b)), (str(b), CONVERSE[relation], str(a))}
    return HeldOut(colour_shapes, frozenset(relations), drawn_alone)


HELDOUT = make_heldout(0)
HOLDOUTS = {h.name: h for h in (HELDOUT, make_heldout(0, drawn_alone=True))}


def holdout_named(name: str) -> HeldOut:
    """The seed-0 split of a design name ("pairings" or "scenes"), with a clear error for any other."""
    if name not in HOLDOUTS:
        raise ValueError(f"unknown holdout {name!r}; choose one of {', '.join(HOLDOUTS)}")
    return HOLDOUTS[name]


def in_split(spec: SceneSpec, split: str, heldout: HeldOut = HELDOUT) -> bool:
    """Whether a caption with this spec belongs to `split` ("train" and "val" share one distribution)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    has_heldout = bool(heldout.combinations_in(spec))
    return has_heldout if split == "heldout" else not has_heldout


if __name__ == "__main__":
    print("held-out colour-shape pairs:", ", ".join(f"{c} {s}" for c, s in sorted(HELDOUT.colour_shapes)))
    print("held-out relations:", ", ".join(" ".join(r) for r in sorted(HELDOUT.relations)))
    for name, h in HOLDOUTS.items():
        print(f"holdout {name!r}: held-out scenes of kinds {', '.join(h.kinds('heldout'))}")
