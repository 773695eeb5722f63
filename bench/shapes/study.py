"""`make bench-shapes`: the shapes study, with seeds and confidence intervals.

    python -m bench.shapes.study [--out outputs/shapes-study] [--seeds 0 1 2] [--steps 400] [--every 100]
                                 [--align-every 200] [--prompts 200] [--jobs 2] [--arms dynamic-kl last-layer ...]
                                 [--start-from scratch|distill] [--distill-steps N]

Arms (each a trainer preset; the shapes sizes come from bench/shapes/adapter.toml):
    teacher          the base model's own bag-of-words text encoder (no training)
    dynamic-kl       the default recipe: min-SNR weighting + annealed, gated KL to the teacher, all-layer fusion
    last-layer       dynamic-kl with last-layer fusion (the ablation of fusing every block)
    uniform, min-snr, kl   plain timestep weightings without the teacher
    timestep-aware   dynamic-kl with the timestep-aware resampler, sampled with guidance
    constant, gated  the teacher term at a constant lambda, on every sample / only on the samples where the
                     teacher's error is lower than the student's (hard gate); ARM_RECIPES: a preset plus --set
With --start-from distill every arm fine-tunes the demo's distilled adapter of its seed (bench.demo.distill: the
demo's recipe and cache, so a run the demo made is reused; its fine-tune lr) into runs/<arm>-from-distill-s<seed>;
the arms default to min-snr, dynamic-kl (the teacher annealed), gated and constant, the distilled start is
evaluated as step 0 (for alignment too), and every arm is compared with min-snr.
For every seed s an arm is trained with --seed s and evaluated at each of its checkpoints (every `--every`
steps): validation epsilon-MSE on fixed val triplets (every checkpoint) and the alignment of held-out prompts
(the final checkpoint of every arm, and every checkpoint of the weighting arms), sampled from noise seed s.
Everything is written under --out and reused: rerunning continues where a run stopped (the trainer resumes
from its latest checkpoint; finished evaluations are read back), so the study can be stopped at any time.

Reported (results.md, results.json):
(a) final alignment per check for the teacher and every arm, with paired bootstrap 95% CIs (over prompts and
    seeds) of every arm minus the teacher and of all-layer minus last-layer fusion;
(b) for uniform, min-snr, kl and dynamic-kl: the steps and the CPU time (steps x that arm's measured
    per-step CPU time, teacher included while it runs, from the trainer's timings.json) to first reach the
    min-snr arm's final validation epsilon-MSE and its final alignment, from the seed-mean curves, and every
    check's alignment at each alignment checkpoint;
(c) timestep-aware minus static (dynamic-kl), alignment and epsilon-MSE, paired CIs;
(d) from the distilled start: R at step 0 and at every checkpoint, every arm minus min-snr (paired CIs), and
    (b) for every teacher arm, with min-snr's final R as the target (its epsilon-MSE: R falls as it rises).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

logger = logging.getLogger(__name__)

TRAINED_ARMS = ("dynamic-kl", "last-layer", "uniform", "min-snr", "kl", "timestep-aware")
WEIGHTING_ARMS = ("uniform", "min-snr", "kl", "dynamic-kl")
BASELINE = "min-snr"
EMPTY = "empty prompt"  # the teacher on "": the zero of the recovered gain R (evaluate.recovered_gain)
START = "distilled start"  # --start-from distill: the distilled adapter every arm starts from (step 0)
# Arms that are a preset plus `--set` overrides; every other arm is the preset of its own name.
ARM_RECIPES: dict[str, tuple[str, tuple[str, ...]]] = {
    "constant": ("constant-teacher", ("loss.teacher_gate=none",)),  # lambda0 at every step, every sample
    "gated": ("constant-teacher", ("loss.teacher_gate=hard",)),  # lambda0, only where the teacher's error is lower
}
# The teacher term's variants against min-snr alone (dynamic-kl: cosine-annealed to 0 by 30%, soft gate).
TEACHER_ARMS = ("min-snr", "dynamic-kl", "gated", "constant")
ARMS = tuple(dict.fromkeys((*TRAINED_ARMS, *ARM_RECIPES)))
START_FROM = ("scratch", "distill")


def arm_flags(arm: str) -> tuple[str, tuple[str, ...]]:
    """(trainer preset, extra trainer flags) of an arm."""
    preset, overrides = ARM_RECIPES.get(arm, (arm, ()))
    return preset, tuple(flag for override in overrides for flag in ("--set", override))


def _read(path: Path):
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _write(path: Path, value) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value), encoding="utf-8")
    os.replace(tmp, path)


class Study:
    """Trains and evaluates arms on demand, caching every result as JSON under `out`."""

    def __init__(self, assets: Path, out: Path, steps: int, every: int, prompts: int, triplets: int, sampler_steps: int,
                 guidance: float, train_images: int = 8000, extra: tuple[str, ...] = (), align_every: int = 0,
                 start_from: str = "scratch", distill_steps: int = 0):
        from .evaluate import load_base_and_llm, make_triplets
        from .assets import holdout_of
        from .pipeline import data_name, ensure_train_data
        from .scenes import heldout_prompts

        self.assets, self.out, self.steps, self.every = assets, out, steps, every
        self.align_every = align_every or every
        self.sampler_steps, self.guidance = sampler_steps, guidance
        self.extra = extra  # more trainer flags for every arm (tests: a smaller batch)
        if start_from not in START_FROM:
            raise ValueError(f"start_from must be one of {START_FROM}, got {start_from!r}")
        self.start_from = start_from
        self.distill_steps = distill_steps  # 0: the demo's
        self.quick = train_images < 8000  # the miniature study: the demo's miniature distillation
        heldout = holdout_of(assets)
        self.data = ensure_train_data(out / data_name(train_images, heldout), n=train_images, heldout=heldout)
        self.base, self.llm = load_base_and_llm(assets)
        self.prompts = heldout_prompts(prompts, heldout=heldout)
        self.triplets = make_triplets(self.base, n=triplets, heldout=heldout)

    def run_dir(self, arm: str, seed: int) -> Path:
        # Runs from the distilled start are other runs than the same arms from scratch: both fit in one --out.
        return self.out / "runs" / f"{arm}{'-from-distill' if self.start_from == 'distill' else ''}-s{seed}"

    def distilled(self, seed: int) -> Path:
        """The demo's distillation run for `seed` (bench.demo.distill: its recipe, its cache, reused once trained)."""
        from bench.demo import DISTILL_STEPS, distill

        return distill(self.assets, seed, self.distill_steps or DISTILL_STEPS, quick=self.quick, quiet=True)

    def train_flags(self, arm: str, seed: int) -> tuple[str, tuple[str, ...]]:
        """(preset, extra trainer flags) of one run; from the distilled start, the demo's fine-tune settings."""
        from bench.demo import FINE_TUNE_FLAGS

        preset, overrides = arm_flags(arm)
        start = (("--init-adapter", str(self.distilled(seed) / "adapter.safetensors"), *FINE_TUNE_FLAGS)
                 if self.start_from == "distill" else ())
        return preset, ("--set", f"checkpoint_every={self.every}", *start, *overrides, *self.extra)

    def train(self, arm: str, seed: int) -> Path:
        from .pipeline import train_adapter

        preset, extra = self.train_flags(arm, seed)
        return train_adapter(self.assets, self.data, self.run_dir(arm, seed), preset=preset, seed=seed,
                             max_steps=self.steps, extra=extra, quiet=True)

    def conditioning(self, arm: str, seed: int, step: int):
        from training.checkpoint import load_checkpoint_adapter

        from .evaluate import adapter_conditioning, empty_conditioning, teacher_conditioning

        if arm == "teacher":
            return teacher_conditioning(self.base)
        if arm == EMPTY:
            return empty_conditioning(self.base)
        if arm == START:
            from adapter import load_adapter

            return adapter_conditioning(load_adapter(self.distilled(seed) / "adapter.safetensors"), self.llm)
        checkpoint = self.run_dir(arm, seed) / "checkpoints" / f"step-{step:08d}"
        return adapter_conditioning(load_checkpoint_adapter(checkpoint), self.llm)

    def evaluation(self, arm: str, seed: int, step: int, with_alignment: bool) -> dict:
        """{'eps': [per triplet], 'checks': [per prompt] or absent}, computed once and cached."""
        from .evaluate import alignment, eps_mse

        # The distilled start's run may sit in a shared cache: its evaluations are kept under `out`.
        folder = {"teacher": self.out / "teacher", EMPTY: self.out / "teacher",
                  START: self.out / "distilled"}.get(arm, self.run_dir(arm, seed)) / "eval"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / (f"seed{seed}-step{step:08d}.json" if arm != EMPTY else f"empty-seed{seed}.json")
        result = _read(path) or {}
        conditioning = None
        if "eps" not in result:
            conditioning = self.conditioning(arm, seed, step)
            result["eps"] = eps_mse(self.base, conditioning, self.triplets).tolist()
            _write(path, result)
        if with_alignment and "checks" not in result:
            conditioning = conditioning or self.conditioning(arm, seed, step)
            _, result["checks"] = alignment(self.base, conditioning, self.prompts, self.sampler_steps, self.guidance,
                                            seed=seed)
            _write(path, result)
        return result

    def step_cpu_seconds(self, arm: str, seed: int) -> np.ndarray:
        """Cumulative CPU seconds of the trainer after each step (its own measurement, teacher included)."""
        timings = _read(self.run_dir(arm, seed) / "timings.json")
        return np.cumsum(timings["step_cpu_times_s"])


def _checks_matrix(evals: list[dict], check: str) -> np.ndarray:
    """[seeds, prompts] of one check (prompts where it applies)."""
    return np.array([[c[check] for c in e["checks"] if check in c] for e in evals], dtype=np.float64)


def first_reach(steps: list[int], values: list[float], target: float, better, cpu, start: float | None = None):
    """The first checkpoint whose value is at least as good as `target` (better(value, target)), with the CPU
    seconds spent to reach it (`cpu`: cumulative per step, cpu[step - 1]): {'steps', 'cpu_s'}, or None when
    none is. `start`: the value before any step (the distilled start), which costs nothing here."""
    if start is not None and better(start, target):
        return {"steps": 0, "cpu_s": 0.0}
    for step, value in zip(steps, values):
        if better(value, target):
            return {"steps": step, "cpu_s": float(cpu[step - 1])}
    return None


def analyse(study: Study, arms: list[str], seeds: list[int]) -> dict:
    from .evaluate import recovered_gain
    from .stats import mean_ci, paired_ci

    steps = list(range(study.every, study.steps + 1, study.every))
    align_steps = [st for st in steps if st % study.align_every == 0 or st == study.steps]
    final = {}
    distilled = study.start_from == "distill"
    for arm in ["teacher", *([START] if distilled else []), *arms]:
        final[arm] = [study.evaluation(arm, s, study.steps if arm in arms else 0, True) for s in seeds]
    checks = sorted({k for e in final["teacher"] for c in e["checks"] for k in c}, key=lambda k: (k == "overall", k))
    results: dict = {"seeds": seeds, "prompts": len(study.prompts), "steps": study.steps, "every": study.every,
                     "align_every": study.align_every, "start_from": study.start_from,
                     "final": {}, "comparisons": {}, "curves": {}, "time_to_target": {}}
    empty_eps = float(np.mean([study.evaluation(EMPTY, s, 0, False)["eps"] for s in seeds]))
    teacher_eps = float(np.mean([e["eps"] for e in final["teacher"]]))
    results["empty_prompt_eps_mse"] = empty_eps
    for arm, evals in final.items():
        results["final"][arm] = {c: mean_ci(_checks_matrix(evals, c)) for c in checks}
        results["final"][arm]["eps_mse"] = mean_ci(np.array([e["eps"] for e in evals]))
        results["final"][arm]["recovered_gain"] = recovered_gain(results["final"][arm]["eps_mse"][0], teacher_eps, empty_eps)
    # Every arm against the teacher (the claim the study tests), then the ablations.
    pairs = [*((a, "teacher") for a in arms), ("dynamic-kl", "last-layer"), ("timestep-aware", "dynamic-kl")]
    if distilled:  # every arm against the teacher-free baseline, which against its start
        pairs += [(a, BASELINE) for a in arms if a != BASELINE] + [(BASELINE, START)]
    for a, b in dict.fromkeys(pairs):
        if a in final and b in final:
            comparison = {c: paired_ci(_checks_matrix(final[a], c), _checks_matrix(final[b], c)) for c in checks}
            comparison["eps_mse"] = paired_ci(np.array([e["eps"] for e in final[a]]), np.array([e["eps"] for e in final[b]]))
            results["comparisons"][f"{a} - {b}"] = comparison

    # Validation epsilon-MSE at every checkpoint of every arm (seconds each); alignment along the way only
    # for the weighting arms, which the time-to-target comparison needs (minutes each).
    weighting = [a for a in arms if a in (*WEIGHTING_ARMS, *TEACHER_ARMS)] if BASELINE in arms else []
    for arm in arms:
        curve = {"step": steps, "eps_mse": []}
        if arm in weighting:  # every check's accuracy at each alignment checkpoint; "overall" is also the target's
            curve.update(align_step=align_steps, overall=[], alignment={c: [] for c in checks})
        for step in steps:
            evals = [study.evaluation(arm, s, step, arm in weighting and step in align_steps) for s in seeds]
            curve["eps_mse"].append(float(np.mean([e["eps"] for e in evals])))
            curve.setdefault("recovered_gain", []).append(recovered_gain(curve["eps_mse"][-1], teacher_eps, empty_eps))
            if arm in weighting and step in align_steps:
                curve["overall"].append(float(np.mean(_checks_matrix(evals, "overall"))))
                for c in checks:
                    curve["alignment"][c].append(float(np.mean(_checks_matrix(evals, c))))
        results["curves"][arm] = curve
    if weighting:
        target = {"eps_mse": results["curves"][BASELINE]["eps_mse"][-1], "overall": results["curves"][BASELINE]["overall"][-1]}
        # Reaching the baseline's final R is reaching its epsilon-MSE: R falls as the loss rises.
        target["recovered_gain"] = recovered_gain(target["eps_mse"], teacher_eps, empty_eps)
        start = results["final"].get(START)
        for arm in weighting:
            cpu = np.mean([study.step_cpu_seconds(arm, s) for s in seeds], axis=0)
            row = {"cpu_s_per_step": float(cpu[-1] / len(cpu))}
            for metric, at, better in (("eps_mse", steps, np.less_equal), ("overall", align_steps, np.greater_equal)):
                row[metric] = first_reach(at, results["curves"][arm][metric], target[metric], better, cpu,
                                          start=start[metric][0] if start else None)
            results["time_to_target"][arm] = row
        results["target"] = target
    return results


def results_markdown(results: dict) -> str:
    from .report import markdown_table

    # Accuracies to 3 decimals; epsilon-MSE (about 0.02, differences of 1e-4) to 5.
    digits = lambda check: 5 if check == "eps_mse" else 3  # noqa: E731
    fmt = lambda m, c="": f"{m[0]:.{digits(c)}f} [{m[1]:.{digits(c)}f}, {m[2]:.{digits(c)}f}]"  # noqa: E731
    dfmt = lambda m, c="": f"{m[0]:+.{digits(c)}f} [{m[1]:+.{digits(c)}f}, {m[2]:+.{digits(c)}f}]"  # noqa: E731
    arms = list(results["final"])
    checks = [c for c in results["final"]["teacher"] if c not in ("eps_mse", "recovered_gain")]
    start_from = (f" from the distilled start (`{START}`: the demo's distilled adapter of each seed, where every "
                  "arm begins)" if results.get("start_from") == "distill" else "")
    out = [f"Seeds {results['seeds']}, {results['prompts']} held-out prompts, {results['steps']} adapter steps{start_from}, "
           f"checkpoints every {results['every']} steps (alignment every {results.get('align_every', results['every'])}). "
           "Mean [95% paired bootstrap CI over prompts and seeds].", "",
           "### Final alignment (accuracy per check) and validation epsilon-MSE", "",
           markdown_table(["check", *arms], [[c, *(fmt(results["final"][a][c], c) for a in arms)] for c in [*checks, "eps_mse"]]
                          + [["R (recovered gain)", *(f"{results['final'][a]['recovered_gain']:.3f}" for a in arms)]]),
           "", f"R = (L_empty - L_arm) / (L_empty - L_teacher) on the seed-mean validation epsilon-MSE; the empty "
           f"prompt's: {results['empty_prompt_eps_mse']:.5f}."]
    if results["comparisons"]:
        names = list(results["comparisons"])
        out += ["", "### Differences", "", markdown_table(
            ["check", *names], [[c, *(dfmt(results["comparisons"][n][c], c) for n in names)] for c in [*checks, "eps_mse"]])]
    if results["curves"]:
        out += ["", f"### Validation epsilon-MSE (and R) at each checkpoint (seed mean; the teacher: "
                    f"{results['final']['teacher']['eps_mse'][0]:.5f})", "", markdown_table(*curve_table(results))]
    aligned = {a: c for a, c in results["curves"].items() if "alignment" in c}
    if aligned:
        teacher = results["final"]["teacher"]
        out += ["", "### Alignment at each alignment checkpoint (seed mean; the teacher's final first)", "",
                markdown_table(["arm", "step", *checks],
                               [["teacher", "-", *(f"{teacher[c][0]:.3f}" for c in checks)]]
                               + [[arm, str(st), *(f"{curve['alignment'][c][i]:.3f}" for c in checks)]
                                  for arm, curve in aligned.items() for i, st in enumerate(curve["align_step"])])]
    if results["time_to_target"]:
        t = results["target"]
        rows = []
        base = results["time_to_target"].get(BASELINE, {})
        for arm, row in results["time_to_target"].items():
            cells = [arm, f"{row['cpu_s_per_step']:.2f}"]
            for metric in ("eps_mse", "overall"):
                hit, ref = row[metric], base.get(metric)
                cells += ["not reached", "-"] if hit is None else [
                    f"{hit['steps']} ({hit['cpu_s'] / 60:.1f} CPU-min)",
                    f"{hit['cpu_s'] / ref['cpu_s']:.2f}" if ref and ref["cpu_s"] > 0 else "-"]
            rows.append(cells)
        r = f"R {t['recovered_gain']:.3f} = " if "recovered_gain" in t else ""
        out += ["", f"### Time to reach {BASELINE}'s final quality ({r}eps-MSE {t['eps_mse']:.4f}, overall {t['overall']:.3f})",
                "", "CPU time = steps x the arm's measured CPU seconds per step (the teacher's forward included while "
                "it runs); 0 steps: its start is already there.",
                "", markdown_table(["arm", "CPU s/step", "steps to R (eps-MSE)", "time ratio", "steps to overall", "time ratio"],
                                   rows)]
    return "\n".join(out) + "\n"


def curve_table(results: dict) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of validation epsilon-MSE and R at each checkpoint per arm; from the distilled start,
    a first row for step 0: the start every arm shares."""
    curves = results["curves"]
    steps = next(iter(curves.values()))["step"]
    rows = [[str(st), *(f"{curves[a]['eps_mse'][i]:.5f} ({curves[a]['recovered_gain'][i]:.3f})" for a in curves)]
            for i, st in enumerate(steps)]
    start = results["final"].get(START)
    if start:
        rows.insert(0, [f"0 ({START})", *[f"{start['eps_mse'][0]:.5f} ({start['recovered_gain']:.3f})"] * len(curves)])
    return ["step", *curves], rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.shapes.study", description=__doc__.split("\n\n")[0])
    parser.add_argument("--assets", type=Path, default=Path("assets/shapes"))
    parser.add_argument("--out", type=Path, default=Path("outputs/shapes-study"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--arms", nargs="+", default=None, choices=ARMS,
                        help=f"default: {' '.join(TRAINED_ARMS)}; with --start-from distill, {' '.join(TEACHER_ARMS)}")
    parser.add_argument("--start-from", choices=START_FROM, default="scratch",
                        help="distill: every arm fine-tunes the demo's distilled adapter of its seed (bench.demo: its "
                             "distillation recipe and cache, its fine-tune lr), trained first where missing")
    parser.add_argument("--distill-steps", type=int, default=0,
                        help="with --start-from distill: the distillation run's steps (default: the demo's)")
    parser.add_argument("--steps", type=int, default=400, help="adapter steps per run (the demo trains 600)")
    parser.add_argument("--every", type=int, default=100, help="checkpoint (and validation epsilon-MSE) every N steps")
    parser.add_argument("--align-every", type=int, default=200,
                        help="alignment of the weighting arms every N steps (a multiple of --every)")
    parser.add_argument("--jobs", type=int, default=2, help="trainer processes at once (one thread each)")
    parser.add_argument("--prompts", type=int, default=200)
    parser.add_argument("--triplets", type=int, default=256)
    parser.add_argument("--sampler-steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--quick", action="store_true", help="miniature untrained assets (tests only)")
    args = parser.parse_args(argv)
    args.arms = args.arms or list(TEACHER_ARMS if args.start_from == "distill" else TRAINED_ARMS)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    import torch
    from tqdm.auto import tqdm

    from .assets import ensure_assets

    if args.steps % args.every or args.align_every % args.every:
        parser.error(f"--steps ({args.steps}) and --align-every ({args.align_every}) must be multiples of --every ({args.every})")
    if args.distill_steps < 0:
        parser.error(f"--distill-steps must be >= 0, got {args.distill_steps}")
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs}")
    torch.set_num_threads(1)
    study = Study(ensure_assets(args.assets, quick=args.quick), args.out, args.steps, args.every, args.prompts, args.triplets,
                  args.sampler_steps, args.guidance, *((64, ("--batch-size", "4")) if args.quick else ()),
                  align_every=args.align_every, start_from=args.start_from, distill_steps=args.distill_steps)
    jobs = [(arm, seed) for seed in args.seeds for arm in args.arms]
    if args.start_from == "distill":  # every seed's start first: its arms (maybe running at once) all read it
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            for future in tqdm(as_completed([pool.submit(study.distilled, s) for s in args.seeds]),
                               total=len(args.seeds), desc="distilling"):
                future.result()
    # Trainer subprocesses do the work; threads here only wait on them. A failed run stops the study
    # with its log tail (the others finish their current run first), and a rerun resumes it.
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = [pool.submit(study.train, arm, seed) for arm, seed in jobs]
        for future in tqdm(as_completed(futures), total=len(futures), desc="training arms"):
            future.result()
    torch.set_num_threads(args.jobs)  # evaluation runs in this process once training is done
    results = analyse(study, args.arms, args.seeds)
    _write(args.out / "results.json", results)
    (args.out / "results.md").write_text(results_markdown(results), encoding="utf-8")
    print(results_markdown(results))
    print(f"written: {args.out / 'results.md'}, {args.out / 'results.json'}")


if __name__ == "__main__":
    main()
