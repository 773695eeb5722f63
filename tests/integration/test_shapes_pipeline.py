"""A few-step smoke run of the whole shapes pipeline: `make demo` and the study, on miniature untrained assets.

The point is the plumbing, not the numbers (untrained models score zero): assets -> training scenes ->
an adapter trained through `python -m training.train` with the real presets -> the same sampler for the
teacher and the adapter -> the scorer -> the files each command promises.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from bench.shapes.assets import ASSETS_VERSION, ensure_assets
from devkit.cache import cache_dir
from devkit.processes import run_in_own_group


@pytest.fixture(scope="module")
def quick_assets():
    return ensure_assets(cache_dir() / f"shapes-assets-quick-v{ASSETS_VERSION}", seed=0, quick=True)


def _run(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "LLMDIFF_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    result = run_in_own_group([sys.executable, *args], env, timeout=1200)  # the trainers it starts die with it
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_demo_trains_an_adapter_and_writes_grid_metrics_and_report(quick_assets, tmp_path):
    out = tmp_path / "demo"
    result = _run(["-m", "bench.demo", "--quick", "--assets", str(quick_assets), "--out", str(out), "--steps", "3",
                   "--distill-steps", "3", "--prompts", "6", "--sampler-steps", "2"], tmp_path)
    assert f"outputs in {out.resolve()}" in result.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["prompts"] == 6 and set(metrics["arms"]) == {"teacher (bag of words)", "adapter (tiny LM, all layers)"}
    for arm in metrics["arms"].values():
        assert {"colour", "shape", "binding", "overall"} <= set(arm)
    # per prompt too, for pooling seeds (bench/demo_seeds.py): the mean of each list is the table's figure
    for name, arm in metrics["per_prompt"].items():
        assert len(arm["colour"]) == 6 and sum(arm["colour"]) / 6 == pytest.approx(metrics["arms"][name]["colour"][0])
    assert set(metrics["eps_mse_val"].values()) and all(v > 0 for v in metrics["eps_mse_val"].values())
    run = Path(metrics["adapter_run"])
    assert (run / "adapter.safetensors").is_file() and ("--preset dynamic-kl" in (run / "train.log").read_text() or
        json.loads((run / "checkpoints" / "step-00000003" / "state.json").read_text())["config"]["loss"]["teacher_schedule"] == "cosine")
    # distillation first (captions only), then the image stage from its adapter
    distilled = [p for p in (tmp_path / "cache" / "shapes").iterdir() if p.name.startswith("demo-distill-")]
    assert len(distilled) == 1 and (distilled[0] / "adapter.safetensors").is_file()
    state = json.loads((run / "checkpoints" / "step-00000003" / "state.json").read_text())
    assert state["config"]["model"]["init_adapter"] == str(distilled[0] / "adapter.safetensors")
    assert isinstance(metrics["recovered_gain"], float) and "recovered gain" in (out / "report.md").read_text()
    grid = Image.open(out / "samples.png")
    assert grid.width > 4 * 2 * 64  # four prompt cells per row, teacher and adapter side by side
    report = (out / "report.md").read_text()
    assert "| check | prompts | teacher | adapter |" in report and "samples.png" in report
    assert metrics["split"] == "heldout" and "| group of prompts | prompts | teacher | adapter |" in report
    assert "a never-drawn colour-shape pairing" in report  # every held-out prompt names a held-out combination

    # a second run reuses the trained adapter instead of training again, here on in-distribution prompts
    again = _run(["-m", "bench.demo", "--quick", "--assets", str(quick_assets), "--out", str(out), "--steps", "3",
                  "--distill-steps", "3", "--prompts", "6", "--sampler-steps", "2", "--split", "val"], tmp_path)
    assert "train:" not in again.stderr
    assert json.loads((out / "metrics.json").read_text())["split"] == "val"
    assert "in-distribution val prompts" in (out / "report.md").read_text()


def test_study_trains_arms_evaluates_checkpoints_and_writes_tables(quick_assets, tmp_path):
    out = tmp_path / "study"
    _run(["-m", "bench.shapes.study", "--quick", "--assets", str(quick_assets), "--out", str(out), "--seeds", "0",
          "--arms", "min-snr", "dynamic-kl", "--steps", "2", "--every", "1", "--align-every", "2", "--jobs", "2", "--prompts", "4",
          "--triplets", "8", "--sampler-steps", "2"], tmp_path)
    results = json.loads((out / "results.json").read_text())
    assert set(results["final"]) == {"teacher", "min-snr", "dynamic-kl"}
    assert set(results["time_to_target"]) == {"min-snr", "dynamic-kl"}
    assert results["time_to_target"]["min-snr"]["eps_mse"]["steps"] <= 2  # the baseline reaches its own final value
    assert len(results["curves"]["dynamic-kl"]["eps_mse"]) == 2  # validation epsilon-MSE at every checkpoint
    assert results["curves"]["dynamic-kl"]["align_step"] == [2] and len(results["curves"]["dynamic-kl"]["overall"]) == 1
    assert {"dynamic-kl - teacher", "min-snr - teacher"} <= set(results["comparisons"])
    assert set(results["curves"]["min-snr"]["alignment"]) == set(results["final"]["teacher"]) - {"eps_mse", "recovered_gain"}
    assert len(results["curves"]["min-snr"]["alignment"]["overall"]) == 1  # every check at each alignment checkpoint
    table = (out / "results.md").read_text()
    assert "Time to reach min-snr's final quality" in table
    assert "### Alignment at each alignment checkpoint" in table and "| min-snr | 2 |" in table
    assert "| step | min-snr | dynamic-kl |" in table and len(results["curves"]["min-snr"]["eps_mse"]) == 2
    evals = sorted((out / "runs" / "dynamic-kl-s0" / "eval").glob("*.json"))
    assert [p.name for p in evals] == ["seed0-step00000001.json", "seed0-step00000002.json"]
    assert "checks" not in json.loads(evals[0].read_text()) and "checks" in json.loads(evals[1].read_text())

    # the diagnosis reads a run folder and a checkpoint folder, and refuses a path that is neither
    run = out / "runs" / "dynamic-kl-s0"
    diagnosis = _run(["-m", "bench.shapes.diagnose", "--assets", str(quick_assets), "--triplets", "8", str(run),
                      str(run / "checkpoints" / "step-00000001")], tmp_path).stdout
    rows = [line.split("|")[1:-1] for line in diagnosis.splitlines() if line.startswith("| ") and "conditioning" not in line]
    assert [r[0].strip() for r in rows] == ["teacher", "empty prompt", str(run), str(run / "checkpoints" / "step-00000001")]
    # eps-MSE and the context statistics are non-negative; R (column 3) is any number, NaN when the untrained
    # teacher is no better than the empty prompt, and exactly 1 for the teacher itself whenever it is defined
    assert all(float(value) >= 0 for r in rows for value in [r[1], *r[3:]])
    gains = [float(r[2]) for r in rows]
    assert (math.isnan(gains[0]) and all(math.isnan(g) for g in gains)) or (gains[0] == 1.0 and gains[1] == 0.0)
    (tmp_path / "not-a-run").mkdir()
    refused = run_in_own_group([sys.executable, "-m", "bench.shapes.diagnose", "--assets", str(quick_assets),
                                str(tmp_path / "not-a-run")], dict(os.environ), timeout=600)
    assert refused.returncode != 0 and "neither an adapter .safetensors file" in refused.stderr


def test_study_from_the_distilled_start_trains_teacher_arms_from_the_demo_distillation(quick_assets, tmp_path):
    out = tmp_path / "study"
    _run(["-m", "bench.shapes.study", "--quick", "--assets", str(quick_assets), "--out", str(out), "--seeds", "0",
          "--start-from", "distill", "--distill-steps", "3", "--arms", "min-snr", "gated", "--steps", "2", "--every", "1",
          "--align-every", "2", "--jobs", "2", "--prompts", "4", "--triplets", "8", "--sampler-steps", "2"], tmp_path)
    # the distillation run is the demo's (its cache folder and key), trained once and shared by the arms
    distilled = [p for p in (tmp_path / "cache" / "shapes").iterdir() if p.name.startswith("demo-distill-")]
    assert len(distilled) == 1 and distilled[0].name.endswith("-quick")
    for arm, gate in (("min-snr", None), ("gated", "hard")):
        state = json.loads((out / "runs" / f"{arm}-from-distill-s0" / "checkpoints" / "step-00000002" / "state.json").read_text())
        assert state["config"]["model"]["init_adapter"] == str(distilled[0] / "adapter.safetensors")
        assert state["config"]["optim"]["lr"] == 3e-4
        if gate:
            assert (state["config"]["loss"]["teacher_schedule"], state["config"]["loss"]["teacher_gate"]) == ("constant", gate)
    results = json.loads((out / "results.json").read_text())
    assert results["start_from"] == "distill" and set(results["final"]) == {"teacher", "distilled start", "min-snr", "gated"}
    assert {"gated - min-snr", "min-snr - distilled start"} <= set(results["comparisons"])
    assert set(results["time_to_target"]) == {"min-snr", "gated"}
    assert len(results["curves"]["gated"]["recovered_gain"]) == 2
    table = (out / "results.md").read_text()
    assert "| 0 (distilled start) |" in table and "steps to R (eps-MSE)" in table
    assert (out / "distilled" / "eval" / "seed0-step00000000.json").is_file()  # kept under --out, not in the cache
