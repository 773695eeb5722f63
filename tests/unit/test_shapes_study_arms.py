"""The shapes study's arms (a preset plus --set overrides, resolved by the trainer's own config layers), its
distilled start (the demo's distillation run and fine-tune settings), and its R and time-to-target maths."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from bench.demo import FINE_TUNE_FLAGS
from bench.shapes import study as st
from bench.shapes.evaluate import recovered_gain
from bench.shapes.pipeline import train_command
from training.config import resolve_config


def _resolved(arm: str, extra: tuple[str, ...] = ()):
    """The trainer's config for an arm, through the exact command line the study runs."""
    preset, flags = st.arm_flags(arm)
    cmd = train_command(Path("assets/shapes"), Path("data"), Path("out"), preset, seed=0, max_steps=300,
                        extra=(*flags, *extra))
    assert cmd[1:3] == ["-m", "training.train"]
    return resolve_config(cmd[3:])[0]


def test_teacher_arms_resolve_to_their_schedule_and_gate():
    loss = {arm: _resolved(arm).loss for arm in st.TEACHER_ARMS}
    assert loss["min-snr"].teacher_schedule == "none" and loss["min-snr"].weighting == "min_snr"
    annealed = loss["dynamic-kl"]
    assert (annealed.teacher_schedule, annealed.teacher_cutoff, annealed.teacher_gate) == ("cosine", 0.3, "soft")
    assert (loss["constant"].teacher_schedule, loss["constant"].teacher_gate) == ("constant", "none")
    assert (loss["gated"].teacher_schedule, loss["gated"].teacher_gate) == ("constant", "hard")
    # the teacher variants differ from the annealed recipe in their schedule and gate only
    for arm in ("constant", "gated"):
        assert (loss[arm].weighting, loss[arm].teacher_lambda0, loss[arm].teacher_weighting) == (
            annealed.weighting, annealed.teacher_lambda0, annealed.teacher_weighting)


def test_arm_flags_pair_every_override_with_set_and_plain_arms_are_their_preset():
    assert st.arm_flags("gated") == ("constant-teacher", ("--set", "loss.teacher_gate=hard"))
    assert st.arm_flags("last-layer") == ("last-layer", ())
    assert set(st.TRAINED_ARMS) <= set(st.ARMS) and set(st.TEACHER_ARMS) <= set(st.ARMS)


def _bare_study(tmp_path: Path, start_from: str, distilled: Path | None = None) -> st.Study:
    """A Study without its models: only what train_flags reads."""
    study = object.__new__(st.Study)
    study.out, study.every, study.extra, study.start_from = tmp_path, 100, (), start_from
    study.distilled = lambda seed: distilled / f"s{seed}"
    return study


def test_distilled_start_fine_tunes_the_demo_run_with_the_demo_lr(tmp_path):
    study = _bare_study(tmp_path, "distill", distilled=tmp_path / "cache")
    preset, extra = study.train_flags("gated", seed=2)
    assert preset == "constant-teacher"
    assert ("--init-adapter", str(tmp_path / "cache" / "s2" / "adapter.safetensors")) == extra[
        extra.index("--init-adapter"):extra.index("--init-adapter") + 2]
    assert " ".join(FINE_TUNE_FLAGS) in " ".join(extra)
    cfg = _resolved("gated", extra)
    assert cfg.model.init_adapter == str(tmp_path / "cache" / "s2" / "adapter.safetensors")
    assert cfg.optim.lr == pytest.approx(3e-4) and cfg.checkpoint_every == 100 and cfg.loss.teacher_gate == "hard"
    assert study.run_dir("gated", 2) == tmp_path / "runs" / "gated-from-distill-s2"

    scratch = _bare_study(tmp_path, "scratch")
    preset, extra = scratch.train_flags("dynamic-kl", seed=0)
    assert preset == "dynamic-kl" and "--init-adapter" not in extra and extra == ("--set", "checkpoint_every=100")
    assert scratch.run_dir("dynamic-kl", 0) == tmp_path / "runs" / "dynamic-kl-s0"  # the layout it always had


def test_study_refuses_an_unknown_start(tmp_path):
    with pytest.raises(ValueError, match="start_from must be one of"):
        st.Study(Path("assets/shapes"), tmp_path, 2, 1, 4, 8, 2, 4.0, start_from="pretrained")


def test_first_reach_finds_the_first_checkpoint_at_target_and_its_cpu_time():
    cpu = np.cumsum(np.full(300, 2.0))  # 2 CPU-s per step
    steps = [100, 200, 300]
    assert st.first_reach(steps, [0.30, 0.20, 0.10], 0.20, np.less_equal, cpu) == {"steps": 200, "cpu_s": 400.0}
    assert st.first_reach(steps, [0.5, 0.6, 0.7], 0.65, np.greater_equal, cpu) == {"steps": 300, "cpu_s": 600.0}
    assert st.first_reach(steps, [0.30, 0.25, 0.21], 0.20, np.less_equal, cpu) is None
    assert st.first_reach(steps, [0.30, 0.25, float("nan")], 0.20, np.less_equal, cpu) is None
    # a start already at the target costs nothing; one short of it changes nothing
    assert st.first_reach(steps, [0.30, 0.20, 0.10], 0.20, np.less_equal, cpu, start=0.19) == {"steps": 0, "cpu_s": 0.0}
    assert st.first_reach(steps, [0.30, 0.20, 0.10], 0.20, np.less_equal, cpu, start=0.21)["steps"] == 200


def _results(start: bool) -> dict:
    """A distilled-start study of two arms, with R computed as analyse computes it."""
    empty, teacher = 0.03, 0.02
    eps = {"min-snr": [0.0205, 0.0202, 0.0200], "gated": [0.0204, 0.0199, 0.0196]}
    gain = lambda v: recovered_gain(v, teacher, empty)  # noqa: E731
    final = {arm: {"overall": (0.6, 0.5, 0.7), "eps_mse": (values[-1], values[-1], values[-1]),
                   "recovered_gain": gain(values[-1])} for arm, values in eps.items()}
    final["teacher"] = {"overall": (0.7, 0.6, 0.8), "eps_mse": (teacher,) * 3, "recovered_gain": 1.0}
    if start:
        final[st.START] = {"overall": (0.55, 0.5, 0.6), "eps_mse": (0.0210,) * 3, "recovered_gain": gain(0.0210)}
    return {"seeds": [0], "prompts": 100, "steps": 300, "every": 100, "align_every": 300,
            "start_from": "distill" if start else "scratch", "empty_prompt_eps_mse": empty,
            "final": final, "comparisons": {},
            "curves": {arm: {"step": [100, 200, 300], "eps_mse": values, "recovered_gain": [gain(v) for v in values]}
                       for arm, values in eps.items()},
            "target": {"eps_mse": 0.0200, "overall": 0.6, "recovered_gain": gain(0.0200)},
            "time_to_target": {"min-snr": {"cpu_s_per_step": 1.0, "eps_mse": {"steps": 300, "cpu_s": 300.0},
                                           "overall": {"steps": 300, "cpu_s": 300.0}},
                               "gated": {"cpu_s_per_step": 2.0, "eps_mse": {"steps": 200, "cpu_s": 400.0},
                                         "overall": None}}}


def test_curve_table_gives_r_per_checkpoint_and_the_shared_start_first():
    header, rows = st.curve_table(_results(start=True))
    assert header == ["step", "min-snr", "gated"]
    assert rows[0] == [f"0 ({st.START})", "0.02100 (0.900)", "0.02100 (0.900)"]  # (0.03 - 0.021) / (0.03 - 0.02)
    assert [r[0] for r in rows[1:]] == ["100", "200", "300"]
    assert rows[2] == ["200", "0.02020 (0.980)", "0.01990 (1.010)"]  # above 1: below the teacher's loss
    header, rows = st.curve_table(_results(start=False))
    assert [r[0] for r in rows] == ["100", "200", "300"]


def test_results_markdown_reports_the_target_r_and_the_time_ratio():
    md = st.results_markdown(_results(start=True))
    assert "from the distilled start" in md and f"| {st.START} |" in md
    assert "### Time to reach min-snr's final quality (R 1.000 = eps-MSE 0.0200, overall 0.600)" in md
    assert "| gated | 2.00 | 200 (6.7 CPU-min) | 1.33 | not reached | - |" in md  # 400 s against min-snr's 300 s
    assert "| min-snr | 1.00 | 300 (5.0 CPU-min) | 1.00 | 300 (5.0 CPU-min) | 1.00 |" in md
    assert not math.isnan(_results(start=True)["target"]["recovered_gain"])


def test_training_scenes_of_each_holdout_get_their_own_cache_name_and_captions(tmp_path):
    from bench.shapes.captions import parse_caption
    from bench.shapes.pipeline import data_name, ensure_captions
    from bench.shapes.splits import HOLDOUTS

    assert data_name(8000) == "train-8000"  # the name the default design's cached scenes always had
    assert data_name(8000, HOLDOUTS["scenes"]) == "train-8000-scenes"
    path = ensure_captions(tmp_path / "captions.txt", n=200, heldout=HOLDOUTS["scenes"])
    specs = [parse_caption(line) for line in path.read_text().splitlines()]
    alone = [s for s in specs if any((o.colour, o.shape) in HOLDOUTS["scenes"].colour_shapes for o in s.objects)]
    assert len(specs) == 200 and alone and all(s.kind in ("single", "count") for s in alone)
