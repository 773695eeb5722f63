"""The shapes benchmark: procedurally drawn scenes of coloured shapes, captions from a grammar, a fixed
split that holds out attribute combinations, and an exact detector-free scorer (docs/design.md section 6).

    from bench.shapes import generate, write_image_folder, heldout_prompts, score, parse_caption

    captions.py        SceneSpec / ObjectSpec (what a caption asserts), the grammar, parse_caption
    splits.py          the held-out combinations (HELDOUT, HOLDOUTS) and which split a spec belongs to
    scenes.py          sampling, exact rendering, generate(), write_image_folder(), heldout_prompts()
    scorer.py          detect(), score(), summarize(): GenEval-style rules without a detector
    scorer_accuracy.py the scorer's own accuracy table (true, degraded, shuffled-caption control)

Pure numpy + pillow + scipy; no torch. Names are imported lazily (PEP 562) so that
`python -m bench.shapes.<module>` does not import its own module twice.
"""
from importlib import import_module

_EXPORTS = {
    "captions": ("SceneSpec", "ObjectSpec", "caption_for", "parse_caption"),
    "splits": ("HELDOUT", "HOLDOUTS", "SPLITS", "HeldOut", "holdout_named", "in_split", "make_heldout"),
    "scenes": ("IMAGE_SIZE", "PALETTE", "Sample", "generate", "heldout_prompts", "render", "write_image_folder"),
    "scorer": ("SceneScore", "Detection", "detect", "score", "summarize"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f".{_WHERE[name]}", __name__), name)
