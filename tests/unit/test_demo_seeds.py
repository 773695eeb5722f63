"""bench/demo_seeds.py: the demo's per-prompt results of several seeds pooled into one paired interval."""
import pytest

from bench.demo_seeds import pool, results_markdown


def _metrics(teacher, adapter, gain):
    return {"prompts": len(teacher), "recovered_gain": gain,
            "arms": {"teacher (toy CLIP)": {}, "adapter (tiny LM, all layers)": {}},
            "per_prompt": {"teacher (toy CLIP)": {"colour": teacher, "binding": teacher},
                           "adapter (tiny LM, all layers)": {"colour": adapter, "binding": adapter}}}


def test_seeds_pool_into_one_paired_difference_over_seeds_and_prompts():
    pooled = pool({0: _metrics([0.0, 1.0, 0.5, 0.5], [0.5, 1.0, 1.0, 0.5], 1.1),
                   1: _metrics([1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 0.5, 0.0], 1.0)})
    colour = pooled["checks"]["colour"]
    assert (pooled["teacher"], pooled["adapter"]) == ("teacher (toy CLIP)", "adapter (tiny LM, all layers)")
    assert colour["teacher"] == pytest.approx(0.5) and colour["adapter"] == pytest.approx(0.6875)
    mean, low, high = colour["adapter_minus_teacher"]
    assert mean == pytest.approx(0.1875) and 0 <= low <= mean <= high <= 0.5  # never below: no prompt got worse
    assert pooled["recovered_gain"] == [1.1, 1.0] and pooled["seeds"] == [0, 1]
    text = results_markdown(pooled, "python -m bench.demo_seeds --seeds 0 1")
    assert "| colour | 4 | 0.500 | 0.688 | +0.188 [" in text and "R per seed: 1.100, 1.000" in text


def test_one_seed_is_refused(capsys):
    from bench.demo_seeds import main

    with pytest.raises(SystemExit):
        main(["--seeds", "3", "3"])
    assert "at least two seeds" in capsys.readouterr().err


def test_a_seed_is_read_back_only_for_the_asked_split_and_the_report_names_it(tmp_path, monkeypatch):
    """`--split val` never pools a seed's held-out metrics.json: the demo reruns (sampling only) for that seed."""
    import json

    from bench import demo
    from bench.demo_seeds import main
    from bench.shapes.assets import DEFAULT_DIR, holdout_of

    calls = []
    holdout = holdout_of(DEFAULT_DIR).name  # what the demo records for the default assets

    def fake_demo(argv):
        out = tmp_path / argv[argv.index("--out") + 1]
        calls.append(argv)
        (out / "metrics.json").write_text(json.dumps({**_metrics([0.0, 1.0], [1.0, 1.0], 1.0), "split": "val",
                                                      "holdout": holdout}))

    for seed in (0, 1):
        (tmp_path / f"s{seed}").mkdir()
        (tmp_path / f"s{seed}" / "metrics.json").write_text(json.dumps(_metrics([0.0, 0.0], [0.0, 0.0], 1.0)))
    monkeypatch.setattr(demo, "main", fake_demo)
    pooled = main(["--seeds", "0", "1", "--split", "val", "--out", str(tmp_path)])
    assert [c[c.index("--split") + 1] for c in calls] == ["val", "val"] and pooled["split"] == "val"
    assert "2 val prompts per seed" in (tmp_path / "results.md").read_text()
    calls.clear()
    main(["--seeds", "0", "1", "--split", "val", "--out", str(tmp_path)])  # now found: nothing reruns
    assert calls == []
    stale = json.loads((tmp_path / "s1" / "metrics.json").read_text())
    other = "pairings" if holdout == "scenes" else "scenes"
    (tmp_path / "s1" / "metrics.json").write_text(json.dumps({**stale, "holdout": other}))  # other assets' split
    main(["--seeds", "0", "1", "--split", "val", "--out", str(tmp_path)])
    assert [c[c.index("--seed") + 1] for c in calls] == ["1"]


def test_binding_by_group_splits_prompts_by_kind_and_by_a_never_drawn_pairing():
    from bench.demo import by_group
    from bench.shapes.captions import parse_caption
    from bench.shapes.scenes import heldout_prompts
    from bench.shapes.splits import HELDOUT

    prompts = heldout_prompts(12)
    teacher = [float(i % 2) for i in range(12)]
    adapter = [1.0] * 12
    groups = by_group({0: _metrics(teacher, adapter, 1.0), 1: _metrics(teacher, adapter, 1.0)})
    assert sum(g["values"] for g in groups.values()) == 24 and all(g["adapter"] == 1.0 for g in groups.values())
    single = [i for i, p in enumerate(prompts) if parse_caption(p).kind == "single"]
    novel = all(any((o.colour, o.shape) in HELDOUT.colour_shapes for o in parse_caption(prompts[i]).objects)
                for i in single)  # a held-out single-object prompt can only be held out for its pairing
    assert novel and groups["single, a never-drawn colour-shape pairing"]["teacher"] == pytest.approx(
        sum(teacher[i] for i in single) / len(single))
    # a base of the "scenes" holdout: its own held-out prompts (two-object scenes only), its own words
    scenes = by_group({0: {**_metrics(teacher, adapter, 1.0), "holdout": "scenes"}})
    assert {name.split(",")[0] for name in scenes} <= {"pair", "relation"}
    assert any(name.endswith("a held-out pairing (trained alone)") for name in scenes)
    partial = _metrics(teacher, adapter, 1.0)
    partial["per_prompt"]["teacher (toy CLIP)"]["relation"] = teacher[:5]  # a check of relation prompts only
    with pytest.raises(ValueError, match="applies to every prompt"):
        by_group({0: partial}, "relation")
