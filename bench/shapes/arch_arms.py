"""Architectures on equal terms: ours, an ELLA-style Perceiver and a RouWei-style module on the shapes benchmark.

    python -m bench.shapes.arch_arms [--out outputs/arch-arms] [--arms ours ella rouwei-unit] [--seeds 0 1 2]
                                     [--steps 600] [--distill-steps N]

Each arm is the trainer's own command line (bench/shapes/pipeline.py's train_command: `--preset dynamic-kl
--config bench/shapes/adapter.toml`, the same data, seed, steps, batch, optimiser and loss), differing only
in `--arch` and that architecture's sizes, scaled to the tiny pipeline:

    ours     LLMDiffAdapter as the study trains it ([arch] of adapter.toml: width 128, 2 refiner + 2 resampler blocks)
    ella     --arch ella: timestep-aware Perceiver, 6 blocks and 64 latents as published, 4 heads, width 64
    rouwei   --arch rouwei-gemma: 2 wide + 3 narrow blocks and 308 = 4 x 77 outputs as published, 4 heads,
             width 64, inputs padded / cut to 32 tokens (the longest shapes prompt is 14 with the template),
             its learned tokens drawn at std 0.02
    rouwei-unit  the same at std 1 (the trainer's default)
    ella-77  ella with 77 latents, the teacher's token count (what the distill stage needs of it)

With `--distill-steps N` every arm first distils onto the teacher's contexts from captions alone (the demo's
distillation recipe, bench/demo.py: `--preset distill`, its batch and lr; ours is the demo's own cached run),
then trains `--steps` dynamic-kl steps from that file at the demo's fine-tune lr (`--init-adapter`), into
runs/<arm>-from-distill-s<seed>; the distilled file is measured as step 0. RouWei's 308 = 4 x 77 tokens regress
chunk by chunk onto the teacher's context; ELLA's 64 latents have no such target (use ella-77).

Neither ELLA nor RouWei has an output projection, so their width is the tiny UNet's context width (64); their
input is the tiny LM's final-norm last hidden state (128 wide) through the same prompt template as ours.
Then the recovered gain R of every checkpoint (bench/shapes/diagnose.py, the same 256 val triplets), the
parameter count and the trainer's s/step (timings.json), per seed; over several seeds also the seed mean of
R at every checkpoint and each arm's final R minus ours' per seed (the same seed means the same data order,
noise and timesteps for every arm). Runs resume and finished runs are reused, so the command can be stopped
and rerun; results.md / results.json go to --out.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

PRESET = "dynamic-kl"
ARMS = {
    "ours": (),
    "ella": ("--arch", "ella", "--set", "ella.heads=4"),
    # its learned tokens (queries, positions) drawn at the usual std 0.02: what was measured first
    "rouwei": ("--arch", "rouwei-gemma", "--set", "rouwei.num_heads=4", "--set", "rouwei.max_input_len=32",
               "--set", "rouwei.init_std=0.02"),
    # the same at unit scale, as our adapter's queries (the trainer's default since that measurement)
    "rouwei-unit": ("--arch", "rouwei-gemma", "--set", "rouwei.num_heads=4", "--set", "rouwei.max_input_len=32",
                    "--set", "rouwei.init_std=1.0"),
    "ella-77": ("--arch", "ella", "--set", "ella.heads=4", "--set", "ella.num_latents=77"),
}


def default_data(assets: Path) -> Path:
    """The cache's 8000 training scenes of the assets' holdout (the demo's folder)."""
    from devkit.cache import cache_dir

    from .assets import holdout_of
    from .pipeline import data_name

    return cache_dir() / "shapes" / data_name(8000, holdout_of(assets))


def run_dir(out: Path, arm: str, seed: int, distill_steps: int = 0) -> Path:
    return out / "runs" / f"{arm}{'-from-distill' if distill_steps else ''}-s{seed}"


def distilled(assets: Path, out: Path, arm: str, seed: int, steps: int) -> Path:
    """The arm's caption-only distillation run (the demo's recipe); ours is the demo's own, from its cache."""
    from bench.demo import DISTILL_FLAGS, distill

    from .assets import holdout_of
    from .pipeline import captions_beside, ensure_captions, train_adapter

    if arm == "ours":
        return distill(assets, seed, steps, quiet=True)
    captions = ensure_captions(captions_beside(default_data(assets)), heldout=holdout_of(assets))
    return train_adapter(assets, captions, out / "runs" / f"{arm}-distill{steps}-s{seed}", preset="distill", seed=seed,
                         max_steps=steps, extra=(*DISTILL_FLAGS, *ARMS[arm]), quiet=True)


def train_arm(assets: Path, data: Path, out: Path, arm: str, seed: int, steps: int, distill_steps: int = 0) -> Path:
    from bench.demo import FINE_TUNE_FLAGS

    from .pipeline import train_adapter

    extra = ARMS[arm]
    if distill_steps:  # the file's own architecture governs: --arch and its sizes are not repeated
        start = distilled(assets, out, arm, seed, distill_steps) / "adapter.safetensors"
        extra = ("--init-adapter", str(start), *FINE_TUNE_FLAGS)
    return train_adapter(assets, data, run_dir(out, arm, seed, distill_steps), preset=PRESET, seed=seed,
                         max_steps=steps, extra=extra, quiet=True)


def measure(assets: Path, out: Path, arms: list[str], seed: int, distill_steps: int = 0) -> dict:
    """R per checkpoint (diagnose), parameters and s/step per arm; from a distilled start, that file as step 0."""
    from training import checkpoint as ckpt

    from . import diagnose

    checkpoints = {arm: ([distilled(assets, out, arm, seed, distill_steps)] if distill_steps else [])
                   + ckpt.complete_checkpoints(run_dir(out, arm, seed, distill_steps)) for arm in arms}
    rows = diagnose.diagnose(assets, [p for arm in arms for p in checkpoints[arm]])
    by_name = {row["name"]: row for row in rows}
    results = {"seed": seed, "preset": PRESET, "distill_steps": distill_steps, "teacher_eps_mse": rows[0]["eps_mse"],
               "empty_eps_mse": rows[1]["eps_mse"], "arms": {}}
    cpu_seconds = lambda run: sum(json.loads((run / "timings.json").read_text(encoding="utf-8"))["step_cpu_times_s"])  # noqa: E731
    for arm in arms:
        timings = json.loads((run_dir(out, arm, seed, distill_steps) / "timings.json").read_text(encoding="utf-8"))
        adapter = ckpt.load_checkpoint_adapter(checkpoints[arm][-1])
        results["arms"][arm] = {
            "flags": list(ARMS[arm]),
            "parameters": sum(p.numel() for p in adapter.parameters()),
            "s_per_step": timings["wall_s"] / max(1, timings["steps"]),
            "cpu_s_per_step": sum(timings["step_cpu_times_s"]) / max(1, timings["steps"]),
            # the distilled file (a run folder, not a checkpoint) is step 0
            "steps": [int(p.name.split("-")[1]) if p.parent.name == "checkpoints" else 0 for p in checkpoints[arm]],
            "distill_cpu_s": cpu_seconds(checkpoints[arm][0]) if distill_steps else 0.0,
            "recovered_gain": [by_name[str(p)]["recovered_gain"] for p in checkpoints[arm]],
            "eps_mse": [by_name[str(p)]["eps_mse"] for p in checkpoints[arm]],
            "token_std": [by_name[str(p)]["token_std"] for p in checkpoints[arm]],
        }
    return results


def seed_summary(per_seed: dict[int, dict]) -> dict:
    """Mean R over seeds at every checkpoint all seeds reached, and each arm's final R minus ours', per seed."""
    seeds = sorted(per_seed)
    arms = list(per_seed[seeds[0]]["arms"])
    summary = {"seeds": seeds, "mean_recovered_gain": {}, "final_minus_ours": {}}
    for arm in arms:
        runs = [per_seed[s]["arms"][arm] for s in seeds]
        steps = sorted(set.intersection(*(set(r["steps"]) for r in runs)))
        summary["mean_recovered_gain"][arm] = {
            str(step): sum(r["recovered_gain"][r["steps"].index(step)] for r in runs) / len(runs) for step in steps}
        if "ours" in arms and arm != "ours":
            summary["final_minus_ours"][arm] = [
                per_seed[s]["arms"][arm]["recovered_gain"][-1] - per_seed[s]["arms"]["ours"]["recovered_gain"][-1]
                for s in seeds]
    return summary


def summary_markdown(summary: dict) -> str:
    from .report import markdown_table

    means = summary["mean_recovered_gain"]
    steps = sorted({int(s) for m in means.values() for s in m}, key=int)
    cell = lambda arm, s: f"{means[arm][str(s)]:.2f}" if str(s) in means[arm] else "-"  # noqa: E731
    table = markdown_table(["step", *means], [[str(s), *(cell(a, s) for a in means)] for s in steps])
    gaps = markdown_table(["arm", "final R - ours, per seed", "mean"],
                          [[arm, ", ".join(f"{g:+.2f}" for g in gap), f"{sum(gap) / len(gap):+.2f}"]
                           for arm, gap in summary["final_minus_ours"].items()])
    return (f"Mean R over seeds {', '.join(map(str, summary['seeds']))}:\n\n{table}\n\n"
            + (f"{gaps}\n" if summary["final_minus_ours"] else ""))


def results_markdown(results: dict) -> str:
    from .report import markdown_table

    arms = results["arms"]
    steps = sorted({s for a in arms.values() for s in a["steps"]})
    cell = lambda a, s: (f"{a['recovered_gain'][a['steps'].index(s)]:.2f}" if s in a["steps"] else "-")  # noqa: E731
    table = markdown_table(["step", *arms], [[str(s), *(cell(arms[a], s) for a in arms)] for s in steps])
    sizes = markdown_table(["arm", "parameters", "s/step (wall)", "CPU s/step", "distillation CPU s"],
                           [[a, f"{v['parameters']:,}", f"{v['s_per_step']:.2f}", f"{v['cpu_s_per_step']:.2f}",
                             f"{v.get('distill_cpu_s', 0.0):.0f}"] for a, v in arms.items()])
    start = (f", from {results['distill_steps']} distillation steps (step 0: the distilled file)"
             if results.get("distill_steps") else "")
    return (f"Seed {results['seed']}, preset {results['preset']}{start}; R = (L_empty - L_arm) / (L_empty - L_teacher) on 256 val "
            f"triplets (teacher eps-MSE {results['teacher_eps_mse']:.5f}, empty prompt {results['empty_eps_mse']:.5f}).\n\n"
            f"{table}\n\n{sizes}\n")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.shapes.arch_arms", description=__doc__.split("\n\n")[0])
    parser.add_argument("--assets", type=Path, default=Path("assets/shapes"))
    parser.add_argument("--data", type=Path, default=None, help="train-8000 image folder (default: the cache's)")
    parser.add_argument("--out", type=Path, default=Path("outputs/arch-arms"))
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--seeds", "--seed", type=int, nargs="+", default=[0], help="one run per arm and seed")
    parser.add_argument("--steps", type=int, default=600, help="steps per arm (checkpoints every 100: adapter.toml)")
    parser.add_argument("--distill-steps", type=int, default=0,
                        help="distil every arm from captions first (the demo's recipe), then --steps image steps from it")
    parser.add_argument("--measure-only", action="store_true", help="skip training; measure the checkpoints there are")
    args = parser.parse_args(argv)
    if args.distill_steps < 0:
        parser.error(f"--distill-steps must be >= 0, got {args.distill_steps}")
    if args.distill_steps and "ella" in args.arms:
        parser.error("--distill-steps: the ella arm's 64 latents have no slot-wise distillation target in the "
                     "teacher's 77 tokens; use the ella-77 arm")
    if not (args.assets / "manifest.json").is_file():
        parser.error(f"{args.assets} holds no shapes assets (no manifest.json): run `make shapes-assets` first")
    import torch

    from .assets import holdout_of
    from .pipeline import ensure_train_data

    torch.set_num_threads(1)
    data = args.data or ensure_train_data(default_data(args.assets), heldout=holdout_of(args.assets))
    seeds = list(dict.fromkeys(args.seeds))
    if not args.measure_only:
        for seed in seeds:  # a whole seed first, so an interrupted run still leaves comparable arms
            for arm in args.arms:  # one at a time: the trainer is single-threaded here
                train_arm(args.assets, data, args.out, arm, seed, args.steps, args.distill_steps)
    per_seed = {seed: measure(args.assets, args.out, args.arms, seed, args.distill_steps) for seed in seeds}
    results = {"per_seed": {str(s): r for s, r in per_seed.items()}, "summary": seed_summary(per_seed)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2), encoding="utf-8")
    text = "\n".join(results_markdown(r) for r in per_seed.values())
    if len(seeds) > 1:
        text += "\n" + summary_markdown(results["summary"])
    (args.out / "results.md").write_text(text, encoding="utf-8")
    print(text)
    return results


if __name__ == "__main__":
    main()
