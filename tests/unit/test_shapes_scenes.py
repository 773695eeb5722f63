"""The shapes benchmark's scene generator, caption grammar and held-out split (bench/shapes/)."""
from __future__ import annotations

import itertools
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from bench.shapes import captions, scenes, splits
from bench.shapes.captions import TEMPLATES, ObjectSpec, SceneSpec, caption_for, parse_caption
from bench.shapes.scenes import BACKGROUND, IMAGE_SIZE, PALETTE, generate, heldout_prompts, write_image_folder
from bench.shapes.splits import HELDOUT, make_heldout


@pytest.fixture(scope="module")
def train():
    return generate("train", 1500, seed=0)


@pytest.fixture(scope="module")
def heldout():
    return generate("heldout", 600, seed=0)


def _same(a, b) -> bool:
    return a.caption == b.caption and a.spec == b.spec and np.array_equal(a.image, b.image)


def test_generate_is_deterministic_per_seed_and_index():
    first = generate("train", 30, seed=7)
    again = generate("train", 30, seed=7)
    assert all(_same(a, b) for a, b in zip(first, again))
    # sample i depends only on (split, seed, i): a shorter run is a prefix of a longer one
    assert all(_same(a, b) for a, b in zip(generate("train", 10, seed=7), first))
    other_seed = generate("train", 30, seed=8)
    assert sum(_same(a, b) for a, b in zip(first, other_seed)) < 3
    val = generate("val", 30, seed=7)  # val is its own stream, not a copy of train
    assert sum(_same(a, b) for a, b in zip(first, val)) < 3


def test_images_are_uint8_rgb_in_palette_colours(train):
    allowed = {BACKGROUND, *PALETTE.values()}
    for sample in train[:100]:
        assert sample.image.shape == (IMAGE_SIZE, IMAGE_SIZE, 3) and sample.image.dtype == np.uint8
        assert {tuple(p) for p in sample.image.reshape(-1, 3)} <= allowed


def test_palette_is_separable_even_on_blurred_edges():
    colours = np.array([BACKGROUND, *PALETTE.values()], float)
    distances = [np.linalg.norm(a - b) for a, b in itertools.combinations(colours, 2)]
    assert min(distances) >= 100
    # A blurred edge between a colour and the background passes through their midpoint; it must not be
    # nearer to a third colour, or every blurred object would grow a ring of that colour.
    for k in range(1, len(colours)):
        for t in np.linspace(0, 1, 21):
            mix = (1 - t) * colours[0] + t * colours[k]
            nearest = np.linalg.norm(colours - mix, axis=1).argmin()
            assert nearest in (0, k), f"mix of background and colour {k} snaps to colour {nearest}"


def test_layout_honours_the_spec_and_keeps_objects_apart(train):
    for sample in train:
        spec, objects = sample.spec, sample.objects
        assert len(objects) == spec.num_objects
        for o in objects:
            assert 0 <= o.x0 and o.x0 + o.side <= IMAGE_SIZE and 0 <= o.y0 and o.y0 + o.side <= IMAGE_SIZE
            centre_cell = (int((o.y0 + o.side / 2) // scenes.CELL), int((o.x0 + o.side / 2) // scenes.CELL))
            assert centre_cell == o.cell
        for a, b in itertools.combinations(objects, 2):
            gap_x = max(b.x0 - (a.x0 + a.side), a.x0 - (b.x0 + b.side))
            gap_y = max(b.y0 - (a.y0 + a.side), a.y0 - (b.y0 + b.side))
            assert max(gap_x, gap_y) >= 3, "objects of one colour must never touch"
        if spec.kind == "single":
            (o,) = objects
            assert (o.colour, o.shape, o.size, o.cell) == (spec.objects[0].colour, spec.objects[0].shape,
                                                            spec.objects[0].size, spec.objects[0].position)
        if spec.kind == "relation":
            a, b = objects
            (ra, ca), (rb, cb) = a.cell, b.cell
            expected = {"left of": ra == rb and ca < cb, "right of": ra == rb and ca > cb,
                        "above": ca == cb and ra < rb, "below": ca == cb and ra > rb}
            assert expected[spec.relation], (sample.caption, a.cell, b.cell)
        described = Counter((o.colour, o.shape) for o in spec.objects for _ in range(o.count))
        assert Counter((o.colour, o.shape) for o in objects) == described


def test_every_caption_parses_back_to_its_spec(train, heldout):
    for sample in train + heldout:
        assert parse_caption(sample.caption) == sample.spec, sample.caption
    assert {s.spec.kind for s in train} == set(captions.KINDS)


def test_every_phrasing_and_synonym_parses_back():
    rng = np.random.default_rng(0)
    specs = [
        SceneSpec("single", (ObjectSpec("red", "circle", size="small", position=(0, 0)),)),
        SceneSpec("single", (ObjectSpec("white", "triangle", size="large", position=(1, 1)),)),
        SceneSpec("count", (ObjectSpec("blue", "square", count=3),)),
        SceneSpec("pair", (ObjectSpec("green", "square"), ObjectSpec("green", "circle"))),
        *[SceneSpec("relation", (ObjectSpec("yellow", "triangle"), ObjectSpec("purple", "circle")), relation=r)
          for r in captions.RELATIONS],
    ]
    seen = set()
    for spec in specs:
        for template in range(len(TEMPLATES[spec.kind])):
            for _ in range(8):  # several draws to cover the synonyms
                caption = caption_for(spec, rng, template)
                seen.add(caption)
                assert parse_caption(caption) == spec, caption
                assert parse_caption(caption.upper() + ".") == spec  # case and a final full stop do not matter
    assert any("to the left of" in c for c in seen) and any("little" in c for c in seen)
    assert any(c.startswith("3 ") for c in seen) and any("three" in c for c in seen)


@pytest.mark.parametrize("text", ["a red circle", "a small orange circle in the top left", "four red circles",
                                  "a red circle left of a red circle", ""])
def test_parse_rejects_text_outside_the_grammar(text):
    with pytest.raises(ValueError, match="caption|two different objects"):
        parse_caption(text)


def test_spec_validation_names_the_bad_value():
    with pytest.raises(ValueError, match="unknown colour 'orange'"):
        ObjectSpec("orange", "circle")
    with pytest.raises(ValueError, match="malformed 'single'"):
        SceneSpec("single", (ObjectSpec("red", "circle"),))  # a single scene states size and position


def test_train_split_never_shows_a_heldout_combination(train):
    for sample in train:
        for o in sample.objects:  # what the picture shows, not only what the caption says
            assert (o.colour, o.shape) not in HELDOUT.colour_shapes, sample.caption
        if sample.spec.relation:
            a, b = sample.spec.objects
            assert (a.shape, sample.spec.relation, b.shape) not in HELDOUT.relations, sample.caption
    # the hold-out is compositional: every word still occurs in training, only the pairings do not
    words = Counter(w for s in train for w in s.caption.split())
    for word in (*captions.COLOURS, *captions.SHAPES):
        assert words[word] + words[word + "s"] > 0, word


def test_heldout_split_is_made_of_heldout_combinations(heldout):
    found_pairs, found_relations = set(), set()
    for sample in heldout:
        pairs = {(o.colour, o.shape) for o in sample.spec.objects} & HELDOUT.colour_shapes
        relation = ()
        if sample.spec.relation:
            a, b = sample.spec.objects
            relation = {(a.shape, sample.spec.relation, b.shape)} & HELDOUT.relations
        assert pairs or relation, sample.caption
        found_pairs |= pairs
        found_relations |= set(relation)
    assert found_pairs == HELDOUT.colour_shapes and found_relations == HELDOUT.relations


def test_heldout_combinations_are_a_latin_selection_closed_under_converse():
    for seed in range(5):
        h = make_heldout(seed)
        assert h == make_heldout(seed)
        colours = [c for c, _ in h.colour_shapes]
        shapes = [s for _, s in h.colour_shapes]
        assert len(set(colours)) == len(colours) == len(set(shapes)) == len(captions.SHAPES)
        for a, relation, b in h.relations:
            assert (b, splits.CONVERSE[relation], a) in h.relations
    assert make_heldout(0) == HELDOUT and len({make_heldout(s) for s in range(5)}) > 1
    with pytest.raises(ValueError, match="unknown split"):
        generate("test", 1)



def test_the_scenes_holdout_draws_every_pairing_alone_and_holds_out_two_object_scenes_with_one():
    """The "scenes" design: a held-out pairing occurs in training only in one-pairing scenes (single, count), the
    held-out split is made of two-object scenes using a held-out pairing or relation, and the default design's
    streams are untouched by the second one."""
    scenes_holdout = splits.holdout_named("scenes")
    assert scenes_holdout.colour_shapes == HELDOUT.colour_shapes and scenes_holdout.relations == HELDOUT.relations
    assert splits.holdout_named("pairings") is HELDOUT and scenes_holdout.kinds("train") == captions.KINDS
    train = generate("train", 1500, seed=0, heldout=scenes_holdout)
    drawn_alone = set()
    for sample in train:
        for o in sample.objects:
            if (o.colour, o.shape) in HELDOUT.colour_shapes:
                assert sample.spec.kind in splits.ONE_PAIRING_KINDS, sample.caption
                drawn_alone.add((o.colour, o.shape))
    assert drawn_alone == HELDOUT.colour_shapes  # every held-out pairing is drawn alone in training
    held = generate("heldout", 300, seed=0, heldout=scenes_holdout)
    assert {s.spec.kind for s in held} == {"pair", "relation"}
    assert all(scenes_holdout.combinations_in(s.spec) and HELDOUT.combinations_in(s.spec) for s in held)
    assert [s.caption for s in generate("heldout", 50, seed=0)] == [s.caption for s in generate(
        "heldout", 50, seed=0, heldout=splits.HOLDOUTS["pairings"])]
    with pytest.raises(ValueError, match="unknown holdout 'words'; choose one of pairings, scenes"):
        splits.holdout_named("words")

def test_heldout_prompts():
    prompts = heldout_prompts(256)
    assert len(prompts) == 256 and prompts == heldout_prompts(256)
    specs = [parse_caption(p) for p in prompts]
    assert len(set(specs)) == 256
    assert all(HELDOUT.combinations_in(s) for s in specs)
    assert {s.kind for s in specs} == set(captions.KINDS)


def test_val_prompts_are_distinct_in_distribution_and_not_the_held_out_ones():
    from bench.shapes.scenes import split_prompts

    prompts = split_prompts("val", 64)
    assert prompts == split_prompts("val", 64) and split_prompts("heldout", 64) == heldout_prompts(64)
    specs = [parse_caption(p) for p in prompts]
    assert len(set(specs)) == 64 and not any(HELDOUT.combinations_in(s) for s in specs)


def test_write_image_folder_round_trips(tmp_path):
    samples = generate("val", 5, seed=1)
    folder = write_image_folder(tmp_path / "data", samples)
    assert sorted(p.name for p in folder.iterdir())[:2] == ["000000.png", "000000.txt"]
    assert len(list(folder.glob("*.png"))) == len(list(folder.glob("*.txt"))) == 5
    for i, sample in enumerate(samples):
        assert np.array_equal(np.asarray(Image.open(folder / f"{i:06d}.png").convert("RGB")), sample.image)
        assert (folder / f"{i:06d}.txt").read_text(encoding="utf-8") == sample.caption
    with pytest.raises(FileExistsError, match="already exists"):
        write_image_folder(folder, samples)
    assert [p.name for p in tmp_path.iterdir()] == ["data"]  # no temporary folder left behind


def test_cli_writes_a_dataset(tmp_path, capsys):
    scenes.main(["--split", "heldout", "--n", "3", "--out", str(tmp_path / "d")])
    assert len(list((tmp_path / "d").glob("*.png"))) == 3
    assert "wrote 3 heldout samples" in capsys.readouterr().out
