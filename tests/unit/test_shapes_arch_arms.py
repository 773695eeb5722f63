"""bench/shapes/arch_arms.py's summary over seeds: the mean R per checkpoint and each arm's final gap to ours."""
import pytest

from bench.shapes.arch_arms import ARMS, seed_summary, summary_markdown


def _run(steps, gains):
    return {"steps": steps, "recovered_gain": gains}


def test_seed_summary_means_common_checkpoints_and_pairs_final_gaps_by_seed():
    per_seed = {
        0: {"arms": {"ours": _run([100, 200], [0.2, 0.6]), "ella": _run([100, 200], [0.0, 0.4])}},
        1: {"arms": {"ours": _run([100, 200, 300], [0.4, 0.8, 0.9]), "ella": _run([100, 200], [0.2, 0.5])}},
    }
    summary = seed_summary(per_seed)
    assert summary["seeds"] == [0, 1]
    # step 300 is left out of ours' mean: seed 0 never reached it
    assert summary["mean_recovered_gain"]["ours"] == pytest.approx({"100": 0.3, "200": 0.7})
    assert summary["mean_recovered_gain"]["ella"] == pytest.approx({"100": 0.1, "200": 0.45})
    # each seed's own final checkpoint: seed 1 ella 0.5 against ours 0.9
    assert summary["final_minus_ours"]["ella"] == pytest.approx([-0.2, -0.4])
    text = summary_markdown(summary)
    assert "| 200 | 0.70 | 0.45 |" in text and "-0.20, -0.40" in text and "| -0.30 |" in text


def test_every_arm_differs_from_ours_only_by_its_architecture_flags():
    assert ARMS["ours"] == ()
    for arm, flags in ARMS.items():
        if arm != "ours":
            assert flags[:2] == ("--arch", "ella" if arm.startswith("ella") else "rouwei-gemma")


@pytest.mark.parametrize("argv, message", [
    (["--distill-steps", "-1"], "--distill-steps must be >= 0"),
    (["--distill-steps", "600", "--arms", "ours", "ella"], "use the ella-77 arm"),
])
def test_bad_distillation_settings_are_refused_before_any_work(argv, message, capsys):
    from bench.shapes.arch_arms import main

    with pytest.raises(SystemExit):
        main(argv)
    assert message in capsys.readouterr().err


def test_a_distilled_start_trains_into_its_own_run_folder(tmp_path):
    from bench.shapes.arch_arms import run_dir

    assert run_dir(tmp_path, "ella-77", 1).name == "ella-77-s1"
    assert run_dir(tmp_path, "ella-77", 1, distill_steps=600).name == "ella-77-from-distill-s1"
