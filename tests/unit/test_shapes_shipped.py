"""`make shapes-assets` (bench/shapes/shipped.py): the chain that builds the shipped assets, on miniature parts."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from bench.shapes import shipped
from bench.shapes.assets import ASSETS_VERSION, BASE_FOLDER, ensure_assets, holdout_of, read_manifest, teacher_kind
from devkit.cache import cache_dir
from support.weights import differing_tensors


@pytest.fixture(scope="module")
def bow():
    return ensure_assets(cache_dir() / f"shapes-assets-quick-v{ASSETS_VERSION}", seed=0, quick=True)


def test_the_chain_composes_a_toy_clip_base_on_the_bow_vae_with_a_binding_lm(bow, tmp_path):
    work, out = tmp_path / "work", tmp_path / "assets"
    assert shipped.build_shipped_assets(out, bow, work, quick=True) == out
    manifest = read_manifest(out)
    assert teacher_kind(out) == "toy CLIP" and holdout_of(out).name == shipped.HOLDOUT == "scenes"
    assert manifest["lm"]["config"]["binding_aux"] == 1.0
    assert manifest["base"]["toy_clip"]["config"]["hard_negatives"] == shipped.TOY_CLIP.hard_negatives
    assert manifest["composed_from"] == {"lm": str(work / "lm"), "base": str(work / "base")}
    assert not differing_tensors(out / BASE_FOLDER / "vae", bow / BASE_FOLDER / "vae")  # the bag of words' VAE, reused
    assert not [p.name for p in work.iterdir() if p.name.startswith(".")]  # no part left half-written
    with pytest.raises(FileExistsError, match="--force"):
        shipped.build_shipped_assets(out, bow, work, quick=True)


def test_a_second_build_reuses_the_finished_parts_of_its_recipe_and_force_rebuilds_them(bow, tmp_path, monkeypatch):
    work = tmp_path / "work"
    shipped.build_shipped_assets(tmp_path / "first", bow, work, quick=True)
    calls = []
    real_build = shipped.build_assets

    def recording_build(out, **kwargs):
        calls.append(kwargs.get("base_from") is not None)  # True: the compose step, which copies
        return real_build(out, **kwargs)

    def refuse(*args, **kwargs):
        raise AssertionError("a finished part was trained again")

    monkeypatch.setattr(shipped, "build_assets", recording_build)
    monkeypatch.setattr("bench.shapes.toy_clip.train_toy_clip", refuse)
    monkeypatch.setattr("bench.shapes.tiny_lm.build_tiny_lm", refuse)
    second = shipped.build_shipped_assets(tmp_path / "second", bow, work, quick=True)
    assert calls == [True]  # only composed
    assert read_manifest(second)["files"] == read_manifest(tmp_path / "first")["files"]
    stats = json.loads((work / "lm" / "stats.json").read_text())
    (work / "lm" / "stats.json").write_text(json.dumps({**stats, "config": {**stats["config"], "steps": 7}}))
    with pytest.raises(AssertionError, match="trained again"):  # a part of another recipe is not reused
        shipped.build_shipped_assets(tmp_path / "third", bow, work, quick=True)
    with pytest.raises(AssertionError, match="trained again"):  # --force: every part of <work> is rebuilt
        shipped.build_shipped_assets(tmp_path / "second", bow, work, quick=True, force=True)


def test_the_command_line_refuses_to_overwrite_or_to_write_over_its_parts(bow, tmp_path, capsys):
    (tmp_path / "assets").mkdir()
    for argv, message in (([], "already exists; pass --force"),
                          (["--force", "--bow", str(tmp_path / "assets")], "must be three different folders"),
                          (["--force", "--bow", str(tmp_path / "work")], "must be three different folders")):
        with pytest.raises(SystemExit):
            shipped.main(["--out", str(tmp_path / "assets"), "--work", str(tmp_path / "work"), "--quick", *argv])
        assert message in capsys.readouterr().err
    assert not (tmp_path / "work").exists()  # refused before any work


def test_ensure_assets_builds_the_default_folder_with_the_shipped_chain(tmp_path, monkeypatch):
    """`make demo` on a checkout without assets/shapes builds the shipped recipe, never the bag of words there."""
    from bench.shapes import assets

    monkeypatch.chdir(tmp_path)
    built = []
    monkeypatch.setattr(shipped, "build_shipped_assets", lambda out, seed=0, force=False: built.append(out) or out)
    monkeypatch.setattr(assets, "build_assets", lambda *a, **k: pytest.fail("built the bag of words"))
    assert assets.ensure_assets(assets.DEFAULT_DIR) == assets.DEFAULT_DIR and built == [assets.DEFAULT_DIR]


def test_the_shipped_assets_are_the_shipped_chains_toy_clip_base_and_binding_lm():
    """assets/shapes is what bench/shapes/shipped.py builds: its recipe's base, VAE and LM, not the bag of words."""
    from bench.shapes.assets import BOW_DIR, DEFAULT_DIR

    repo = Path(__file__).resolve().parents[2]
    manifest = read_manifest(repo / DEFAULT_DIR)
    assert teacher_kind(repo / DEFAULT_DIR) == "toy CLIP" and teacher_kind(repo / BOW_DIR) == "bag of words"
    assert holdout_of(repo / DEFAULT_DIR).name == shipped.HOLDOUT and holdout_of(repo / BOW_DIR).name == "pairings"
    assert manifest["base"]["toy_clip"]["config"] == dataclasses.asdict(shipped.TOY_CLIP)
    assert manifest["base"]["config"]["unet_steps"] == shipped.UNET_STEPS
    assert manifest["lm"]["config"] == dataclasses.asdict(shipped.BINDING_LM)
    assert not differing_tensors(repo / DEFAULT_DIR / BASE_FOLDER / "vae", repo / BOW_DIR / BASE_FOLDER / "vae")
    assert manifest["composed_from"] == {"lm": str(shipped.WORK_DIR / "lm"), "base": str(shipped.WORK_DIR / "base")}


def test_the_probe_draws_its_captions_from_the_assets_own_split(bow, tmp_path, capsys):
    from bench.shapes.probe import main as probe

    out = shipped.build_shipped_assets(tmp_path / "assets", bow, tmp_path / "work", quick=True)
    probe(["--assets", str(out), "--readers", "base", "--train", "60", "--test", "30"])
    assert 'held-out objects of the "scenes" split' in capsys.readouterr().out
    probe(["--assets", str(out), "--readers", "base", "--train", "60", "--test", "30", "--holdout", "pairings"])
    assert 'held-out objects of the "pairings" split' in capsys.readouterr().out
