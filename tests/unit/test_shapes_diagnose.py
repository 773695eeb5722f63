"""The context statistics of bench/shapes/diagnose.py, on contexts whose answers are known."""
import pytest
import torch

from bench.shapes.diagnose import context_stats, main


def test_a_shared_offset_has_no_token_spread():
    offset = torch.tensor([3.0, -4.0])  # RMS 3.5355
    stats = context_stats(offset.expand(5, 7, 2))
    assert stats["token_std"] == pytest.approx(0.0, abs=1e-6)
    assert stats["offset_rms"] == pytest.approx(stats["rms"]) == pytest.approx((12.5) ** 0.5)


def test_zero_mean_tokens_have_no_offset():
    tokens = torch.tensor([[1.0, -2.0], [-1.0, 2.0]])  # per-channel mean 0, std across tokens sqrt(2), sqrt(8)
    stats = context_stats(tokens.expand(3, 2, 2))
    assert stats["offset_rms"] == pytest.approx(0.0, abs=1e-6)
    assert stats["rms"] == pytest.approx((2.5) ** 0.5)
    assert stats["token_std"] == pytest.approx((2 ** 0.5 + 8 ** 0.5) / 2)


def test_missing_assets_are_refused_with_the_command_that_makes_them(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--assets", str(tmp_path)])
    assert "make shapes-assets" in capsys.readouterr().err


@pytest.mark.parametrize("name, content, message", [
    ("missing", None, "does not exist"),
    ("empty-folder", "dir", "not a complete checkpoint"),
    ("garbage.safetensors", b"not a safetensors file", "neither an adapter .safetensors file"),
])
def test_what_is_not_an_adapter_is_refused_with_the_reason(tmp_path, name, content, message):
    from bench.shapes.diagnose import load_any_adapter

    path = tmp_path / name
    if content == "dir":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(SystemExit, match=message):
        load_any_adapter(path, llm=None)


def test_split_heldout_scores_the_triplets_of_held_out_scenes(capsys):
    """The same rows on triplets of held-out scenes, named in the table."""
    from bench.shapes.assets import ASSETS_VERSION, ensure_assets
    from devkit.cache import cache_dir

    assets = ensure_assets(cache_dir() / f"shapes-assets-quick-v{ASSETS_VERSION}", seed=0, quick=True)
    val, heldout = (main(["--assets", str(assets), "--triplets", "8", "--split", split]) for split in ("val", "heldout"))
    assert "| conditioning | heldout eps-MSE |" in capsys.readouterr().out
    assert [r["name"] for r in heldout] == ["teacher", "empty prompt"]
    assert val[0]["eps_mse"] != heldout[0]["eps_mse"]  # other scenes, other numbers


def test_alignment_samples_held_out_prompts_and_pairs_every_adapter_with_the_teacher(capsys):
    from bench.shapes.assets import ASSETS_VERSION, ensure_assets
    from bench.shapes.diagnose import alignment_table
    from devkit.cache import cache_dir

    assets = ensure_assets(cache_dir() / f"shapes-assets-quick-v{ASSETS_VERSION}", seed=0, quick=True)
    rows = main(["--assets", str(assets), "--triplets", "4", "--alignment", "3"])
    assert "Held-out alignment, 3 prompts" in capsys.readouterr().out
    assert all(len(r["checks"]) == 3 for r in rows)
    adapter = {**rows[0], "name": "an adapter", "checks": [{**c, "overall": True} for c in rows[0]["checks"]]}
    table = alignment_table([rows[0], rows[1], adapter])
    teacher_overall = sum(c["overall"] for c in rows[0]["checks"]) / 3
    assert "| an adapter |" in table and f"1.000 ({1 - teacher_overall:+.3f} [" in table
    with pytest.raises(SystemExit):
        main(["--assets", str(assets), "--alignment", "-1"])
    assert "--alignment is a number of prompts" in capsys.readouterr().err


def test_slots_splice_one_group_of_the_students_slots_into_the_teachers_context():
    """`--slots`: words are the caption's tokens between start and end-of-text, summary the end-of-text slot and
    the padding; a spliced context is the student's in that group and the teacher's everywhere else."""
    from bench.shapes import evaluate as ev
    from bench.shapes.assets import ASSETS_VERSION, ensure_assets
    from bench.shapes.diagnose import slot_groups, spliced
    from devkit.cache import cache_dir

    assets = ensure_assets(cache_dir() / f"shapes-assets-quick-v{ASSETS_VERSION}", seed=0, quick=True)
    base, _ = ev.load_base_and_llm(assets)
    prompts = ["a red circle", "a blue square left of a green triangle"]
    groups = slot_groups(base, prompts, 77)
    assert groups["words"].sum(dim=1).tolist() == [3, 8]  # one token per word in the toy CLIP's vocabulary
    assert groups["summary"].sum(dim=1).tolist() == [77 - 4, 77 - 9]  # end-of-text at slot 4 and 9, then padding
    assert not (groups["words"] & groups["summary"]).any() and not groups["words"][:, 0].any()
    teacher = ev.teacher_conditioning(base)

    def student(batch):  # a context unlike the teacher's in every slot
        return lambda t: (teacher(batch)(t)[0] + 1, None)
    with torch.no_grad():
        ours, theirs = teacher(prompts)(0)[0], student(prompts)(0)[0]
        for group, take in groups.items():
            context = spliced(base, teacher, student, group)(prompts)(0)[0]
            assert torch.equal(context[take], theirs[take]) and torch.equal(context[~take], ours[~take])
