"""bench/shapes/toy_clip.py: InfoNCE on tensors whose loss is known, hard negatives through the caption grammar,
the text tower's SD1.x set-up (causal, learned positions, EOS padding), and a few training steps end to end."""
import json
import math

import numpy as np
import pytest
import torch

from bench.shapes.toy_clip import ToyClipConfig, hard_negative, info_nce, make_text_encoder, twins
from support.weights import differing_tensors


def test_info_nce_on_known_tensors():
    eye = torch.eye(2)
    # scale e^0 = 1: logits [[1, 0], [0, 1]] both ways, CE = -log(e / (e + 1))
    one_way = -math.log(math.e / (math.e + 1))
    assert info_nce(eye, eye, torch.tensor(0.0)).item() == pytest.approx(one_way)
    # a negative equal to text 0 competes for image 0 (logits [1, 0, 1]) and image 1 ([0, 1, 0]), not text-to-image
    image_to_text = (-math.log(math.e / (2 * math.e + 1)) - math.log(math.e / (math.e + 2))) / 2
    got = info_nce(eye, eye, torch.tensor(0.0), negatives=eye[:1]).item()
    assert got == pytest.approx((image_to_text + one_way) / 2)
    # the learnt scale is clamped at 100 (CLIP's temperature floor 0.01)
    assert info_nce(eye, eye, torch.tensor(10.0)).item() == pytest.approx(math.log1p(math.exp(-100.0)), abs=1e-12)


@pytest.mark.parametrize("caption, expected", [
    ("a red circle and a blue square", {"colours": "a blue circle and a red square"}),
    ("a red circle to the left of a blue square", {"colours": "a blue circle to the left of a red square",
                                                   "relation": "a red circle to the right of a blue square"}),
    ("a red circle is beneath a red square", {"relation": "a red circle is over a red square"}),
    ("a green triangle placed over a white triangle", {"colours": "a white triangle placed over a green triangle",
                                                       "relation": "a green triangle placed under a white triangle"}),
    ("a red circle and a blue circle", {}),  # swapped colours: the same picture
    ("two green triangles", {}),
    ("a small red circle in the top left", {}),
])
def test_twins_say_what_they_should(caption, expected):
    assert twins(caption) == expected


def test_every_generated_caption_has_grammatical_twins_and_hard_negatives_pick_one():
    from bench.shapes.captions import parse_caption
    from bench.shapes.scenes import generate

    rng = np.random.default_rng(0)
    with_twin = 0
    for sample in generate("train", 300) + generate("heldout", 100):
        found = twins(sample.caption)  # raises if a twin would not parse to what was meant
        for text in found.values():
            assert parse_caption(text) != sample.spec
        negative = hard_negative(sample.caption, rng)
        assert (negative is None) == (not found) and (negative is None or negative in found.values())
        with_twin += bool(found)
    assert with_twin > 100


@pytest.mark.parametrize("field, value, message", [
    ("hard_negatives", 1.5, "between 0 and 1"), ("width", 30, "multiple of --heads"), ("steps", 0, "at least 1"),
    ("lr", -1.0, "positive"),
])
def test_bad_settings_are_refused(field, value, message):
    with pytest.raises(ValueError, match=message):
        ToyClipConfig(**{field: value}).validate()


@pytest.fixture(scope="module")
def tokenizer():
    from bench.shapes.scenes import generate
    from bench.shapes.tiny_base import build_clip_tokenizer

    return build_clip_tokenizer([s.caption for s in generate("train", 300)])


def test_text_tower_is_causal_positional_and_padded_with_eos_as_sd(tokenizer):
    from bench.shapes.tiny_base import tokenize

    torch.manual_seed(0)
    encoder = make_text_encoder(tokenizer, ToyClipConfig()).eval()
    assert encoder.config.num_hidden_layers == 2 and encoder.config.hidden_size == 64
    ids = tokenize(tokenizer, ["a red circle and a blue square", "a red circle and a green square",
                               "a blue circle and a red square"])
    assert (ids[:, -1] == tokenizer.eos_token_id).all()  # padded with EOS, and no attention mask is passed
    with torch.no_grad():
        out = encoder(ids)
    states = out.last_hidden_state
    first_diff = int((ids[0] != ids[1]).nonzero()[0])
    torch.testing.assert_close(states[0, :first_diff], states[1, :first_diff])  # causal: later words unseen
    assert not torch.allclose(states[0, -1], states[1, -1])  # padding slots summarise the whole prompt
    circle = ids[0].tolist().index(tokenizer("circle", add_special_tokens=False).input_ids[0])
    assert not torch.allclose(states[0, circle], states[2, circle])  # the noun's state depends on its colour
    eos = ids[0].tolist().index(tokenizer.eos_token_id)
    torch.testing.assert_close(out.pooler_output[0], states[0, eos])  # pooled = first EOS state


def test_a_few_steps_train_save_and_read_back_through_the_probe(tmp_path):
    from bench.shapes.probe import clip_reader
    from bench.shapes.toy_clip import save, train_toy_clip

    config = ToyClipConfig(steps=3, batch=8, train_images=40, eval_images=8, hard_negatives=1.0)
    model, tokenizer, stats = train_toy_clip(config)
    assert math.isfinite(stats["final_loss"]) and stats["hard_negatives_per_step"] > 0
    assert 0 <= stats["heldout"]["retrieval_top1"] <= 1
    out = save(model, tokenizer, stats, tmp_path / "clip")
    read, loaded_tokenizer = clip_reader(out)
    states, ids = read(["a red circle and a blue square"])
    with torch.no_grad():
        torch.testing.assert_close(states, model.text_encoder(ids).last_hidden_state)


def test_a_base_built_on_a_toy_clip_keeps_it_frozen_and_reuses_the_given_vae(tmp_path):
    """`bench.shapes.assets --toy-clip F --vae-from B`: the saved base's text side is the toy CLIP, bit for bit
    (the UNet learnt to read it, it did not learn with it), its VAE is B's, and the manifest says so."""
    from bench.shapes.assets import (ASSETS_VERSION, BASE_FOLDER, BOW_DIR, build_assets, ensure_assets,
                                     holdout_of, read_manifest, teacher_kind)
    from bench.shapes.splits import HOLDOUTS
    from bench.shapes.toy_clip import save, train_toy_clip
    from devkit.cache import cache_dir

    reference = ensure_assets(cache_dir() / f"shapes-assets-quick-v{ASSETS_VERSION}", seed=0, quick=True)
    config = ToyClipConfig(width=32, steps=2, batch=8, train_images=40, eval_images=8, holdout="scenes")
    clip = save(*train_toy_clip(config), tmp_path / "clip")
    with pytest.raises(ValueError, match="trained with holdout 'scenes'.*give --holdout scenes"):
        build_assets(tmp_path / "assets", quick=True, toy_clip=clip, vae_from=reference / BASE_FOLDER)
    out = build_assets(tmp_path / "assets", quick=True, toy_clip=clip, vae_from=reference / BASE_FOLDER,
                       holdout="scenes", unet_steps=2)
    base = out / BASE_FOLDER
    for part, source in (("text_encoder", clip), ("vae", reference / BASE_FOLDER)):
        assert not differing_tensors(base / part, source / part), f"{part} changed"
    assert differing_tensors(base / "unet", reference / BASE_FOLDER / "unet")  # the comparison can fail: retrained
    assert (json.loads((base / "tokenizer" / "vocab.json").read_text())
            == json.loads((clip / "tokenizer" / "vocab.json").read_text()))
    unet = json.loads((base / "unet" / "config.json").read_text())
    assert unet["cross_attention_dim"] == config.width
    manifest = read_manifest(out)
    assert manifest["base"]["text_side"] == "frozen: clip" and manifest["base"]["vae"]["reused_from"] == BASE_FOLDER
    assert manifest["base"]["toy_clip"]["config"]["width"] == config.width
    assert manifest["holdout"] == manifest["base"]["config"]["holdout"] == "scenes"
    assert manifest["base"]["config"]["unet_steps"] == 2 and manifest["base"]["unet"]["first_loss"] > 0
    assert holdout_of(out) is HOLDOUTS["scenes"] and holdout_of(reference) is HOLDOUTS["pairings"]
    assert holdout_of(BOW_DIR) is HOLDOUTS["pairings"]  # the bag-of-words manifest predates the field
    assert holdout_of(tmp_path / "none", if_missing="pairings") is HOLDOUTS["pairings"]  # a folder without assets
    assert holdout_of(out, if_missing="pairings") is HOLDOUTS["scenes"]  # ...only then
    with pytest.raises(FileNotFoundError, match="make shapes-assets"):
        holdout_of(tmp_path / "none")
    assert (teacher_kind(out), teacher_kind(reference)) == ("toy CLIP", "bag of words")  # what reports call the teacher
    assert ensure_assets(out, quick=True) == out  # a finished toy-CLIP folder is reused as it is
    with pytest.raises(ValueError, match="--toy-clip"):
        ensure_assets(out, seed=1, quick=True)  # ...and never silently rebuilt on the bag of words


def test_assets_composed_from_a_built_lm_and_a_built_base_copy_both_and_say_so(tmp_path, capsys):
    """`bench.shapes.assets --lm-from LM --base-from ASSETS`: a new LM beside an existing base, nothing retrained:
    the LM's files and the base's files are the sources', the base's teacher scores carry over, the manifest names
    both sources; parts that cannot be composed are refused before any work."""
    from bench.shapes.assets import ASSETS_VERSION, BASE_FOLDER, LM_FOLDER, ensure_assets, main, read_manifest
    from bench.shapes.tiny_lm import main as build_lm
    from devkit.cache import cache_dir

    reference = ensure_assets(cache_dir() / f"shapes-assets-quick-v{ASSETS_VERSION}", seed=0, quick=True)
    lm = tmp_path / "lm"
    build_lm(["--out", str(lm), "--steps", "1"])
    out = tmp_path / "composed"
    main(["--out", str(out), "--quick", "--lm-from", str(lm), "--base-from", str(reference)])
    manifest, before = read_manifest(out), read_manifest(reference)
    assert manifest["base"] == before["base"]
    assert {k: v for k, v in manifest["lm"].items() if k != "folder"} == json.loads((lm / "stats.json").read_text())
    assert manifest["composed_from"] == {"lm": str(lm), "base": str(reference)}
    for path, entry in before["files"].items():
        if path.startswith(BASE_FOLDER + "/"):
            assert manifest["files"][path] == entry, path
    assert (out / LM_FOLDER / "model.safetensors").read_bytes() == (lm / "model.safetensors").read_bytes()

    for argv, message in (
        (["--lm-from", str(tmp_path)], "not an LM built by"),
        (["--base-from", str(tmp_path)], "no manifest.json"),
        (["--base-from", str(reference)], "quick True"),  # a quick base for a full build
        (["--quick", "--base-from", str(reference), "--vae-from", str(reference / BASE_FOLDER)], "drop --toy-clip"),
        (["--quick", "--base-from", str(reference), "--holdout", "scenes"], "drop --holdout"),
        (["--quick", "--holdout", "words"], "invalid choice: 'words'"),
        (["--quick", "--unet-steps", "0"], "--unet-steps must be at least 1"),
        (["--quick", "--unet-steps", "5", "--base-from", str(reference)], "--base-from copies one"),
    ):
        with pytest.raises(SystemExit):
            main(["--out", str(tmp_path / "refused"), *argv])
        assert message in capsys.readouterr().err
        assert not (tmp_path / "refused").exists()
