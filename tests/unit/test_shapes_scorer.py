"""The exact, detector-free shapes scorer (bench/shapes/scorer.py) and its accuracy report."""
from __future__ import annotations

import dataclasses
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from bench.shapes.captions import ObjectSpec, SceneSpec
from bench.shapes.scenes import BACKGROUND, PALETTE, PlacedObject, generate, render
from bench.shapes.scorer import Detection, detect, relations_between, score, summarize
from bench.shapes.scorer_accuracy import accuracy_table, evaluate


@pytest.fixture(scope="module")
def samples():
    return generate("train", 200, seed=11) + generate("heldout", 200, seed=11)


def _truth(sample):
    return Counter((o.colour, o.shape, o.size, o.cell) for o in sample.objects)


def test_detect_recovers_every_object_of_true_renders(samples):
    for sample in samples[:150]:
        found = Counter((d.colour, d.shape, d.size, d.cell) for d in detect(sample.image))
        assert found == _truth(sample), sample.caption


def test_at_least_99_percent_on_true_renders(samples):
    summary = evaluate(samples)
    assert summary["n"] == 400
    assert summary["overall"] >= 0.99, summary
    assert min(v for k, v in summary.items() if k != "n") >= 0.99, summary


def test_negative_control_shuffled_captions_score_low(samples):
    true = evaluate(samples)["overall"]
    shuffled = evaluate(samples, shuffle=True)
    assert shuffled["overall"] <= 0.1, shuffled  # chance level: another scene's caption rarely fits
    assert shuffled["overall"] < true - 0.8


def _single(colour="red", shape="triangle", size="large", cell=(1, 0)):
    return SceneSpec("single", (ObjectSpec(colour, shape, size=size, position=cell),))


def _image(*objects):
    """Render objects given as (colour, shape, size, cell), centred in their cells."""
    side = {"small": 10, "large": 16}
    placed = [PlacedObject(c, s, z, cell, round((cell[1] + 0.5) * 64 / 3 - side[z] / 2),
                           round((cell[0] + 0.5) * 64 / 3 - side[z] / 2), side[z]) for c, s, z, cell in objects]
    return render(placed)


@pytest.mark.parametrize("wrong, failing", [
    (dict(colour="blue"), {"colour", "binding", "size", "position"}),
    (dict(shape="circle"), {"shape", "binding", "size", "position"}),
    (dict(size="small"), {"size"}),
    (dict(cell=(1, 2)), {"position"}),
])
def test_each_wrong_attribute_fails_its_own_check(wrong, failing):
    image = _image(("red", "triangle", "large", (1, 0)))
    assert score(image, _single()).checks == dict.fromkeys(
        ("colour", "shape", "binding", "no_extra", "size", "position", "overall"), True)
    checks = score(image, _single(**wrong)).checks
    assert {k for k, ok in checks.items() if not ok} == failing | {"overall"}


def test_relation_count_and_extra_objects():
    image = _image(("red", "circle", "small", (0, 0)), ("blue", "square", "large", (0, 2)))
    objs = (ObjectSpec("red", "circle"), ObjectSpec("blue", "square"))
    assert score(image, SceneSpec("relation", objs, "left of")).overall
    assert score(image, "a red circle to the left of a blue square").overall
    wrong = score(image, SceneSpec("relation", objs, "right of"))
    assert not wrong.overall and not wrong.checks["relation"] and wrong.checks["binding"]
    assert not score(image, SceneSpec("relation", objs, "above")).overall
    assert score(image, SceneSpec("pair", objs)).overall

    three = _image(*[("green", "square", "small", (r, 1)) for r in range(3)])
    assert score(three, "three green squares").overall
    two = score(three, "two green squares")
    assert not two.overall and not two.checks["count"] and not two.checks["no_extra"]

    extra = _image(("red", "triangle", "large", (1, 0)), ("white", "circle", "small", (2, 2)))
    result = score(extra, _single())
    assert not result.overall and not result.checks["no_extra"] and result.checks["position"]


def test_relations_follow_genevals_rule():
    def det(x, y, side=10):
        return Detection("red", "circle", "small", (0, 0), (x, y), (x - side // 2, y - side // 2, x + side // 2,
                                                                     y + side // 2), side * side, 1.0)
    assert relations_between(det(10, 32), det(32, 32)) == {"left of"}
    assert relations_between(det(32, 53), det(32, 10)) == {"below"}
    assert relations_between(det(10, 10), det(32, 32)) == {"left of", "above"}  # diagonal: both hold
    assert relations_between(det(10, 30), det(40, 32)) == {"left of"}  # small vertical offset: horizontal only
    assert relations_between(det(30, 30), det(32, 31)) == set()  # overlapping boxes: no relation


def test_specks_and_clutter_are_not_objects():
    image = _image(("red", "circle", "large", (1, 1)))
    image[2:5, 2:5] = PALETTE["blue"]  # a 9-pixel speck
    image[60, 5:60] = PALETTE["yellow"]  # a thin line: large, but no shape fits it
    assert [(d.colour, d.shape) for d in detect(image)] == [("red", "circle")]


def test_other_resolutions_are_judged_on_the_same_grid(samples):
    for sample in samples[:30]:
        big = np.asarray(Image.fromarray(sample.image).resize((128, 128), Image.NEAREST))
        assert Counter((d.colour, d.shape, d.size, d.cell) for d in detect(big)) == _truth(sample)
        assert score(big, sample.spec).overall


def test_snapping_tolerates_noise_but_not_foreign_colours():
    image = _image(("purple", "square", "large", (0, 0)))
    noisy = np.clip(image + np.random.default_rng(0).normal(0, 15, image.shape), 0, 255).astype(np.uint8)
    assert [(d.colour, d.shape) for d in detect(noisy)] == [("purple", "square")]
    image[image.sum(-1) != sum(BACKGROUND)] = (0, 0, 0)  # black is far from every palette colour
    assert detect(image) == []


def test_bad_input_says_what_to_do():
    with pytest.raises(ValueError, match="RGB uint8"):
        detect(np.zeros((64, 64, 3), np.float32))
    with pytest.raises(ValueError, match="not a shapes-benchmark caption"):
        score(np.zeros((64, 64, 3), np.uint8), "a cat on a mat")


def test_summarize_counts_only_applicable_checks(samples):
    scores = [score(s.image, s.spec) for s in samples[:40]]
    wrong = [dataclasses.replace(s, checks={**s.checks, "overall": False}) for s in scores[:10]]
    summary = summarize(wrong + scores[10:])
    assert summary["n"] == 40 and summary["overall"] == pytest.approx(0.75)
    assert "count" not in summarize([score(samples[0].image, _single())])


def test_accuracy_table_reports_every_condition():
    table = accuracy_table(n=24, seed=0)
    rows = {line.split(" | ")[0].lstrip("| "): line for line in table.splitlines()[2:]}
    assert rows["true renders"].split(" | ")[1] == "100.0%"
    assert "negative control: true renders vs shuffled captions" in rows
    assert any(name.startswith("gaussian blur") for name in rows) and len(rows) == 8
