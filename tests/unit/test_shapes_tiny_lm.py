"""The tiny LM's binding continuations: true, only where they need the binding, deterministic; the LM still loads."""
import numpy as np
import pytest

from bench.shapes.scenes import PlacedObject, generate
from bench.shapes.tiny_lm import binding_continuation, training_texts


def _obj(colour, shape, cell):
    return PlacedObject(colour, shape, "small", cell, 0, 0, 10)


def _all_continuations(objects, positions_asserted=False, draws=200):
    return {binding_continuation(objects, np.random.default_rng(i), positions_asserted) for i in range(draws)}


def test_each_question_asks_the_right_attribute_of_the_right_object():
    scene = [_obj("red", "circle", (0, 0)), _obj("blue", "square", (0, 2))]
    assert _all_continuations(scene) == {"the circle is red .", "the square is blue .",
                                         "the red one is a circle .", "the blue one is a square ."}
    # the caption says where they are (a relation): the same row, so left/right only, never top/bottom
    assert _all_continuations(scene, positions_asserted=True) - _all_continuations(scene) == {
        "the left one is red .", "the left one is a circle .", "the right one is blue .", "the right one is a square ."}
    column = [_obj("red", "circle", (2, 1)), _obj("blue", "square", (0, 1))]
    assert {c for c in _all_continuations(column, True) if "one is" in c and "the red" not in c
            and "the blue" not in c} == {"the top one is blue .", "the top one is a square .",
                                         "the bottom one is red .", "the bottom one is a circle ."}


def test_no_question_whose_answer_the_binding_does_not_decide():
    # two circles: "the circle" is ambiguous, and "the red one is a circle" is true of either object
    assert _all_continuations([_obj("red", "circle", (0, 0)), _obj("blue", "circle", (1, 1))]) == {None}
    assert _all_continuations([_obj("red", "circle", (0, 0)), _obj("blue", "circle", (0, 1))], True) == {
        "the left one is red .", "the right one is blue ."}
    # one object, or identical ones: nothing to bind
    assert _all_continuations([_obj("red", "circle", (1, 1))], True) == {None}
    assert _all_continuations([_obj("red", "circle", (0, 0)), _obj("red", "circle", (2, 2))], True) == {None}


def test_training_texts_are_deterministic_and_only_extend_two_object_captions():
    samples = generate("train", 60, seed=0)
    captions = [s.caption for s in samples]
    assert training_texts(samples, 0.0, 0) == captions
    texts = training_texts(samples, 0.5, 0)
    assert texts == training_texts(samples, 0.5, 0) and texts != training_texts(samples, 0.5, 1)
    extended = [(s, t) for s, t in zip(samples, texts) if t != s.caption]
    assert 0 < len(extended) < len(samples)
    for sample, text in extended:
        assert sample.spec.kind in ("pair", "relation") and text.startswith(sample.caption + " . the ")
    assert sum(t != c for t, c in zip(training_texts(samples, 1.0, 0), captions)) > len(extended)


def test_all_pairings_text_holds_the_held_out_combinations_the_default_text_never_does():
    """`--all-pairings`: the LM's text covers the pairings the images hold out; by default none of them."""
    from dataclasses import replace

    from bench.shapes.splits import HELDOUT
    from bench.shapes.tiny_lm import LMConfig, text_samples

    config = replace(LMConfig.quick(), train_captions=300)
    default = text_samples(config, seed=0)
    everything = text_samples(replace(config, all_pairings=True), seed=0)
    assert not any(HELDOUT.combinations_in(s.spec) for s in default)
    held = [s for s in everything if HELDOUT.combinations_in(s.spec)]
    # 3 of the 18 colour-shape pairings and 4 ordered relations are held out: many of 300 scenes assert one
    assert len(held) >= 10 and len(everything) == len(default) == 300


def test_a_binding_lm_covers_the_continuation_words_and_loads_like_the_shipped_one(tmp_path):
    from dataclasses import replace

    from adapter import load_llm
    from bench.shapes.tiny_lm import CONTINUATION_WORDS, LMConfig, build_tiny_lm

    folder, stats = build_tiny_lm(tmp_path / "lm", replace(LMConfig.quick(), binding_continuations=1.0), seed=0)
    llm = load_llm(folder)
    ids = llm.tokenizer(CONTINUATION_WORDS + " circle red", add_special_tokens=False).input_ids
    assert llm.tokenizer.unk_token_id not in ids
    assert 0.0 <= stats["heldout_continuation_accuracy"] <= 1.0
    assert np.isfinite(stats["heldout_perplexity"]) and stats["config"]["binding_continuations"] == 1.0


@pytest.mark.parametrize("argv, message", [
    (["--out", "{tmp}"], "already exists"),
    (["--out", "{tmp}/new", "--binding-continuations", "1.5"], "in [0, 1]"),
    (["--out", "{tmp}/new", "--steps", "0"], "--steps must be at least 1"),
    (["--out", "{tmp}/new", "--answer-weight", "0"], "answer_weight must be positive"),
])
def test_the_command_refuses_bad_arguments(tmp_path, capsys, argv, message):
    from bench.shapes.tiny_lm import main

    with pytest.raises(SystemExit):
        main([a.format(tmp=tmp_path) for a in argv])
    assert message in capsys.readouterr().err


def test_the_answer_weight_lands_on_the_answer_word_only_and_is_the_plain_loss_at_one(tmp_path):
    """`--answer-weight`: the weight sits on the continuation's answer ("red" in "... . the circle is red ."), on no
    other token and on no caption without a continuation; at 1 the weighted loss is the model's own."""
    from dataclasses import replace

    import torch

    from bench.shapes.tiny_lm import LMConfig, _batch, build_tiny_lm, weighted_loss
    from adapter import load_llm

    folder, _ = build_tiny_lm(tmp_path / "lm", replace(LMConfig.quick(), binding_continuations=1.0), seed=0)
    llm = load_llm(folder)
    texts = ["a red circle and a blue square . the circle is red .", "a red circle and a blue square"]
    batch = _batch(llm.tokenizer, texts, answer_weight=5.0)
    weighted = (batch["weights"] == 5.0).nonzero().tolist()
    assert len(weighted) == 1 and weighted[0][0] == 0
    assert llm.tokenizer.decode([int(batch["input_ids"][0, weighted[0][1]])]).strip() == "red"
    assert torch.equal(batch["weights"] > 0, batch["labels"] != -100)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()
    plain_batch = _batch(llm.tokenizer, texts)
    out = model(input_ids=plain_batch["input_ids"], attention_mask=plain_batch["attention_mask"],
                labels=plain_batch["labels"])
    torch.testing.assert_close(weighted_loss(out.logits, plain_batch), out.loss)
    assert not torch.allclose(weighted_loss(out.logits, batch), out.loss)


def test_binding_aux_labels_sit_on_each_noun_with_its_colour_and_never_on_a_held_out_pairing(tmp_path):
    """`--binding-aux`: the colour labels mark the two nouns of a pair or relation caption (also before a
    continuation), nothing else, and no held-out colour-shape pairing (so a probe on those stays a real test)."""
    from dataclasses import replace

    from adapter import load_llm
    from bench.shapes.captions import COLOURS
    from bench.shapes.splits import HELDOUT
    from bench.shapes.tiny_lm import LMConfig, _batch, build_tiny_lm

    folder, _ = build_tiny_lm(tmp_path / "lm", replace(LMConfig.quick(), binding_continuations=1.0), seed=0)
    tokenizer = load_llm(folder).tokenizer
    colour, shape = sorted(HELDOUT.colour_shapes)[0]
    other = next(c for c in COLOURS if (c, "circle") not in HELDOUT.colour_shapes and c != colour)
    texts = ["a red circle and a green square . the circle is red .", f"a {colour} {shape} and a {other} circle",
             "a small red circle in the top left", "two blue squares"]
    batch = _batch(tokenizer, texts, binding_labels=True)
    words = lambda row: [tokenizer.decode([int(batch["input_ids"][row, t])]).strip()  # noqa: E731
                         for t in (batch["colours"][row] != -100).nonzero().flatten().tolist()]
    labelled = lambda row: [COLOURS[int(c)] for c in batch["colours"][row] if c != -100]  # noqa: E731
    # the caption's nouns only, not the continuation's "circle"
    assert words(0) == ["circle", "square"] and labelled(0) == ["red", "green"]
    assert words(1) == ["circle"] and labelled(1) == [other]  # the held-out pairing gets no label
    assert labelled(2) == [] and labelled(3) == []  # one-object and count captions bind nothing


def test_a_binding_aux_lm_trains_its_head_and_saves_a_plain_llama(tmp_path):
    from dataclasses import replace

    from adapter import load_llm
    from bench.shapes.tiny_lm import LMConfig, build_tiny_lm, main

    folder, stats = build_tiny_lm(tmp_path / "lm", replace(LMConfig.quick(), binding_aux=1.0, steps=3), seed=0)
    assert np.isfinite(stats["final_binding_aux_loss"]) and stats["config"]["binding_aux"] == 1.0
    assert load_llm(folder).hidden_states is not None  # loads like any Llama: the head was not saved
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "new"), "--binding-aux", "-1"])
