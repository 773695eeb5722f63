"""bench/shapes/probe.py: the linear probe on features whose answer is known, noun finding, and that a
bag-of-words encoder's noun state carries no colour by construction."""
import pytest
import torch

from bench.shapes.probe import binding_objects, features, fit_probe, noun_positions, single_token_id


def _data(n, classes=6, dims=20, seed=0):
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(classes, (n,), generator=gen)
    x = torch.randn(n, dims, generator=gen)
    x[:, :classes] += 4.0 * torch.nn.functional.one_hot(y, classes)  # the label is written in, with noise
    return x, y


def test_a_probe_reads_a_label_the_states_encode_and_not_a_shuffled_one():
    x, y = _data(600)
    x_test, y_test = _data(600, seed=1)
    assert fit_probe(x, y, 6).accuracy(x_test, y_test) > 0.9
    shuffled = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(2))]
    assert abs(fit_probe(x, shuffled, 6).accuracy(x_test, y_test) - 1 / 6) < 0.08


@pytest.mark.parametrize("x, y, message", [
    (torch.zeros(4), torch.zeros(4, dtype=torch.long), "features"),
    (torch.zeros(4, 2), torch.zeros(3, dtype=torch.long), "features"),
    (torch.zeros(2, 2), torch.tensor([0, 6]), "labels must lie in"),
])
def test_bad_probe_inputs_are_refused(x, y, message):
    with pytest.raises(ValueError, match=message):
        fit_probe(x, y, 6)


def test_nouns_are_found_in_mention_order_even_when_repeated():
    assert noun_positions([0, 5, 7, 9, 7, 1], [7, 7]) == [2, 4]
    assert noun_positions([0, 7, 3, 7], [7], start=2) == [3]
    with pytest.raises(ValueError, match="does not occur"):
        noun_positions([0, 7, 9, 8], [8, 7])  # the second noun must come after the first


def test_only_two_object_captions_are_probed_with_objects_in_mention_order():
    items = binding_objects(["a red circle to the left of a blue square", "two green triangles",
                             "in the center, a small red circle", "one white square and one red circle"])
    assert [(c.split()[1], [(o.colour, o.shape) for o in objs]) for c, objs in items] == [
        ("red", [("red", "circle"), ("blue", "square")]), ("white", [("white", "square"), ("red", "circle")])]


@pytest.fixture(scope="module")
def clip_tokenizer():
    from bench.shapes.scenes import generate
    from bench.shapes.tiny_base import build_clip_tokenizer

    return build_clip_tokenizer([s.caption for s in generate("train", 300)])


def test_shape_words_are_single_tokens_and_other_words_are_refused(clip_tokenizer):
    assert isinstance(single_token_id(clip_tokenizer, "circle"), int)
    with pytest.raises(ValueError, match="single token"):
        single_token_id(clip_tokenizer, "zqxv")


def test_a_bag_of_words_noun_state_is_the_same_whatever_its_colour(clip_tokenizer):
    from bench.shapes.tiny_base import make_text_encoder, tokenize

    torch.manual_seed(0)
    encoder = make_text_encoder(clip_tokenizer, 32).eval()

    def read(captions):
        ids = tokenize(clip_tokenizer, captions)
        return encoder(ids).last_hidden_state, ids

    items = binding_objects(["a red circle and a blue square", "a blue circle and a red square"])
    x, y, pairs = features(read, clip_tokenizer, items)
    assert pairs == [("red", "circle"), ("blue", "square"), ("blue", "circle"), ("red", "square")]
    assert y.tolist() != [y[0]] * 4
    torch.testing.assert_close(x[0], x[2])  # circle: red or blue, one state
    torch.testing.assert_close(x[1], x[3])


def test_offset_reads_the_state_that_many_tokens_after_each_noun(clip_tokenizer):
    from bench.shapes.tiny_base import tokenize

    def read(captions):  # each position's state is its own index: which position was read is visible
        ids = tokenize(clip_tokenizer, captions)
        return torch.arange(ids.shape[1]).float().expand(len(captions), -1)[..., None], ids

    items = binding_objects(["a red circle and a blue square"])
    at_noun, _, _ = features(read, clip_tokenizer, items)
    after, _, _ = features(read, clip_tokenizer, items, offset=1)
    assert (after - at_noun).flatten().tolist() == [1.0, 1.0]
    with pytest.raises(ValueError, match="past the end"):
        features(read, clip_tokenizer, items, offset=100)


@pytest.mark.parametrize("argv, message", [
    (["--readers"], "nothing to probe"),
    (["--l2", "-1"], "--l2 must be non-negative"),
    (["--test", "0"], "--test must be at least 1"),
    (["--readers", "--toy-clip", "{tmp}"], "is not a toy CLIP folder"),
    (["--assets", "{tmp}"], "make shapes-assets"),
    (["--lm", "{tmp}"], "is not an LM folder"),
    (["--readers", "base", "--lm", "{tmp}"], "add them to --readers"),
    (["--offset", "-1"], "--offset must be non-negative"),
    (["--holdout", "words"], "invalid choice: 'words'"),
])
def test_the_command_refuses_bad_arguments_with_what_to_do(tmp_path, capsys, argv, message):
    from bench.shapes.probe import main

    with pytest.raises(SystemExit):
        main([a.format(tmp=tmp_path) for a in argv])
    assert message in capsys.readouterr().err
