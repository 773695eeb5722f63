"""The shapes benchmark's tiny models, built in --quick mode (miniature, untrained): folders, loading, bag of words.

The quick assets are built once per machine into the test cache (`ensure_assets` reuses a finished
folder), so this file costs a few seconds after the first run.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from bench.shapes.assets import ASSETS_VERSION, BASE_FOLDER, LM_FOLDER, ensure_assets, read_manifest
from devkit.cache import cache_dir


@pytest.fixture(scope="module")
def assets():
    return ensure_assets(cache_dir() / f"shapes-assets-quick-v{ASSETS_VERSION}", seed=0, quick=True)


@pytest.fixture(scope="module")
def text_encoder_and_tokenizer(assets):
    from transformers import CLIPTextModel, CLIPTokenizer

    base = assets / BASE_FOLDER
    return (CLIPTextModel.from_pretrained(base / "text_encoder", local_files_only=True).eval(),
            CLIPTokenizer.from_pretrained(base / "tokenizer", local_files_only=True))


def _encode(encoder_and_tokenizer, captions):
    from bench.shapes.tiny_base import tokenize

    encoder, tokenizer = encoder_and_tokenizer
    ids = tokenize(tokenizer, captions)
    with torch.no_grad():
        return ids, encoder(ids)[0]


def test_manifest_lists_every_file_with_its_hash(assets):
    manifest = read_manifest(assets)
    assert manifest["version"] == ASSETS_VERSION and manifest["quick"] is True and manifest["seed"] == 0
    on_disk = {p.relative_to(assets).as_posix() for p in assets.rglob("*") if p.is_file()} - {"manifest.json"}
    assert set(manifest["files"]) == on_disk
    import hashlib
    assert f"{LM_FOLDER}/config.json" in manifest["files"]
    for name, entry in manifest["files"].items():
        assert entry["sha256"] == hashlib.sha256((assets / name).read_bytes()).hexdigest(), name
    assert manifest["total_bytes"] == sum(f["bytes"] for f in manifest["files"].values())
    for key in ("val_perplexity", "heldout_perplexity", "train_seconds"):
        assert np.isfinite(manifest["lm"][key])
    assert 0 <= manifest["base"]["vae"]["roundtrip_val"]["overall"] <= 1
    assert manifest["base"]["teacher"]["heldout"]["n"] > 0
    assert not list(assets.parent.glob(f".{assets.name}.tmp-*")), "a temporary build folder was left behind"


def test_lm_folder_loads_through_the_adapter_and_gives_every_layer(assets):
    from adapter import TemplateConfig, encode_prompts, load_llm

    llm = load_llm(assets / LM_FOLDER)
    assert llm.info.model_type == "llama" and llm.info.num_layers == 2  # quick: 2 blocks (4 in the full model)
    prompts = ["a red circle to the left of a blue square", ""]
    with torch.no_grad():
        encoded = encode_prompts(llm, TemplateConfig(), prompts)
    assert encoded.hidden_states.shape[:2] == (2, llm.info.num_layers + 1)
    assert torch.isfinite(encoded.hidden_states).all()
    # the chat template wraps the prompt: the user's span starts after <s><|user|> and covers its 10 words
    ids = encoded.attention_mask.new_tensor(llm.tokenizer(
        llm.tokenizer.apply_chat_template([{"role": "user", "content": prompts[0]}], tokenize=False),
        add_special_tokens=False)["input_ids"])
    start, end = encoded.infos[0].user_span
    assert (start, end) == (2, 12)
    assert llm.tokenizer.convert_ids_to_tokens(ids[:start].tolist()) == ["<s>", "<|user|>"]
    assert encoded.infos[1].user_span[0] == encoded.infos[1].user_span[1]  # empty prompt: empty span, not zero tokens


def test_lm_tokenizer_knows_every_caption_word(assets):
    from transformers import AutoTokenizer

    from bench.shapes.scenes import generate, heldout_prompts

    tokenizer = AutoTokenizer.from_pretrained(assets / LM_FOLDER, local_files_only=True)
    captions = heldout_prompts(64) + [s.caption for s in generate("val", 64, seed=1)]
    ids = tokenizer(captions, add_special_tokens=False)["input_ids"]
    assert all(tokenizer.unk_token_id not in row for row in ids)
    assert tokenizer("a purple hexagon", add_special_tokens=False)["input_ids"][-1] == tokenizer.unk_token_id


def test_lm_folder_loads_with_transformers_as_a_causal_lm(assets):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(assets / LM_FOLDER, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(assets / LM_FOLDER, local_files_only=True)
    batch = tokenizer(["a red circle"], return_tensors="pt")
    with torch.no_grad():
        out = model(**batch, output_hidden_states=True)
    assert out.logits.shape[-1] == len(tokenizer)
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1


def test_base_folder_is_a_stable_diffusion_pipeline_that_generates(assets):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(assets / BASE_FOLDER, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.scheduler.config.prediction_type == "epsilon"
    assert pipe.scheduler.config.beta_schedule == "scaled_linear" and pipe.scheduler.config.num_train_timesteps == 1000
    assert pipe.text_encoder.config.num_hidden_layers == 0
    out = pipe("a red circle", height=64, width=64, num_inference_steps=2, guidance_scale=3.0, output_type="np",
               generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (1, 64, 64, 3) and np.isfinite(out.images).all()
    assert pipe.unet.config.sample_size == 16 and pipe.vae_scale_factor == 4  # 64x64 images, 16x16 latents


def test_text_encoder_position_embeddings_are_zero(text_encoder_and_tokenizer):
    encoder, _ = text_encoder_and_tokenizer
    position = getattr(encoder, "text_model", encoder).embeddings.position_embedding.weight
    assert torch.count_nonzero(position) == 0


def test_text_encoder_is_a_bag_of_words(text_encoder_and_tokenizer):
    """Permuting words permutes the token vectors: the multiset (hence any pooling) is unchanged."""
    caption = "a small red circle in the top left"
    shuffled = "left top the in circle red small a"
    ids, (states, states_shuffled) = _encode(text_encoder_and_tokenizer, [caption, shuffled])
    assert sorted(ids[0].tolist()) == sorted(ids[1].tolist())  # same tokens (one per word here) ...
    assert not torch.equal(ids[0], ids[1])  # ... in another order
    # each position's vector depends only on its token id: sort the rows by id and they coincide
    order0, order1 = ids[0].argsort(stable=True), ids[1].argsort(stable=True)
    torch.testing.assert_close(states[order0], states_shuffled[order1])
    torch.testing.assert_close(states.mean(0), states_shuffled.mean(0))


def test_text_encoder_cannot_bind_colours_to_shapes(text_encoder_and_tokenizer):
    """The swap that changes the picture ("which colour is the circle?") is invisible after mean pooling."""
    _, states = _encode(text_encoder_and_tokenizer,
                        ["a red circle left of a blue square", "a blue circle left of a red square",
                         "a red circle left of a green square"])
    pooled = states.mean(1)
    torch.testing.assert_close(pooled[0], pooled[1])
    assert not torch.allclose(pooled[0], pooled[2], atol=1e-4)  # a different colour word does change it


def test_clip_tokenizer_keeps_caption_words_whole_and_encodes_anything(text_encoder_and_tokenizer):
    _, tokenizer = text_encoder_and_tokenizer
    assert tokenizer.tokenize("a red circle left of a blue square") == [
        "a</w>", "red</w>", "circle</w>", "left</w>", "of</w>", "a</w>", "blue</w>", "square</w>"]
    ids = tokenizer("a magenta hexagon!")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.unk_token_id not in ids[1:-1]  # unseen words fall back to byte pieces


def test_clip_tokenizer_ships_vocab_and_merges_files(assets):
    tokenizer_dir = assets / BASE_FOLDER / "tokenizer"
    vocab = json.loads((tokenizer_dir / "vocab.json").read_text(encoding="utf-8"))
    merges = (tokenizer_dir / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert {"<|startoftext|>", "<|endoftext|>", "circle</w>"} <= set(vocab)
    assert merges[0].startswith("#version") and all(len(line.split(" ")) == 2 for line in merges[1:])


def test_lm_build_is_deterministic(tmp_path):
    from bench.shapes.tiny_lm import LMConfig, build_tiny_lm

    config = LMConfig.quick()
    a, stats_a = build_tiny_lm(tmp_path / "a", config, seed=3)
    b, stats_b = build_tiny_lm(tmp_path / "b", config, seed=3)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert stats_a["val_perplexity"] == stats_b["val_perplexity"]
    c, _ = build_tiny_lm(tmp_path / "c", config, seed=4)
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()


def test_build_refuses_to_overwrite(assets):
    from bench.shapes.assets import build_assets

    with pytest.raises(FileExistsError, match="--force"):
        build_assets(assets, quick=True)


@pytest.mark.parametrize("folder, command", [("DEFAULT_DIR", "make shapes-assets"), ("BOW_DIR", "make shapes-assets-bow")])
def test_shipped_assets_match_their_manifest_and_this_version(folder, command):
    """assets/shapes (what `make demo` uses without an hour-long build) and assets/shapes-bow (the negative
    control) are complete, unaltered and current."""
    import hashlib
    from pathlib import Path

    from bench.shapes import assets

    root = Path(__file__).resolve().parents[2] / getattr(assets, folder)
    manifest = read_manifest(root)
    assert (manifest["version"], manifest["seed"], manifest["quick"]) == (ASSETS_VERSION, 0, False), \
        f"{root.name} is stale: rebuild it with `{command}` and commit it"
    on_disk = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and p.name != "manifest.json")
    assert on_disk == sorted(manifest["files"])
    for name, entry in manifest["files"].items():
        assert hashlib.sha256((root / name).read_bytes()).hexdigest() == entry["sha256"], name
    assert manifest["total_bytes"] < 20e6
