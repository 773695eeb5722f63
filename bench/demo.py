"""`make demo`: the whole method, trained and measured on a CPU, on the shapes benchmark (docs/design.md section 6).

    make demo        (= python -m bench.demo [--prompts 100] [--distill-steps 600] [--steps 300] [--out outputs/demo])
                     (python -m bench.demo --split val: the same on in-distribution prompts)

1. assets   the tiny LM and the tiny base model (the weak teacher) from assets/shapes/, which the repo ships
            (made by `make shapes-assets`); built here first if that folder is missing or stale.
2. data     the captions of 8000 training scenes (and, when the image stage runs, the scenes themselves),
            written once to <cache>/shapes/.
3. train    an adapter for the tiny LM through the trainer's real command line: first caption-only distillation
            onto the teacher's contexts (`python -m training.train --preset distill ...`, --distill-steps), then,
            with --steps > 0, the `dynamic-kl` image stage from that adapter (`--preset dynamic-kl --init-adapter`),
            into <cache>/shapes/demo-<key>; a later run with the same assets and settings reuses it.
4. evaluate teacher and adapter sample the same held-out prompts (attribute combinations never seen in
            training) from the same noise with the same sampler; the exact scorer checks every image; the
            recovered gain R on fixed validation triplets says how much of the teacher's gain is reached.
5. write    outputs/demo/samples.png (teacher | adapter, caption under each pair), metrics.json, report.md.

<cache> is $LLMDIFF_CACHE or ~/.cache/llm-diff-adapter. Nothing is downloaded.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

OUT = Path("outputs/demo")
GRID_PROMPTS = 16
DISTILL_STEPS = 600  # caption-only steps (about 0.2-0.6 s each here) before the image stage
IMAGE_STEPS = 300  # dynamic-kl steps after distillation (about 1.1 s each here)
# The shapes config (bench/shapes/adapter.toml) sizes both stages; distillation keeps its preset's batch and lr,
# and the image stage fine-tunes a distilled adapter at a tenth of the from-scratch lr (docs/parity_results.md).
DISTILL_FLAGS = ("--batch-size", "64", "--set", "optim.lr=2e-3")
FINE_TUNE_FLAGS = ("--set", "optim.lr=3e-4")
PROMPT_KINDS = {"heldout": "held-out prompts (attribute combinations never seen in training)",
                "val": "in-distribution val prompts (every combination seen in training)"}
SCENES_HOLDOUT_WORDS = " (scenes holdout: never together in one scene; every pairing drawn alone in training)"


def cache_dir() -> Path:
    path = Path(os.environ.get("LLMDIFF_CACHE", Path.home() / ".cache" / "llm-diff-adapter")) / "shapes"
    path.mkdir(parents=True, exist_ok=True)
    return path


def run_key(assets: Path, steps: int, distill_steps: int = 0) -> str:
    """Changes whenever the assets, the benchmark's trainer settings or the step budgets change."""
    from bench.shapes.pipeline import SHAPES_CONFIG
    from training.config import preset_path

    digest = hashlib.sha256((assets / "manifest.json").read_bytes() + SHAPES_CONFIG.read_bytes() + str(steps).encode()
                            + (f"|distill {distill_steps}|".encode() + preset_path("distill").read_bytes()
                               + " ".join(DISTILL_FLAGS + (FINE_TUNE_FLAGS if steps else ())).encode()
                               if distill_steps else b""))
    return digest.hexdigest()[:12]


def distill(assets: Path, seed: int = 0, steps: int = DISTILL_STEPS, quick: bool = False, quiet: bool = False) -> Path:
    """The demo's caption-only distillation run for `seed` in <cache>: trained once, then found by its key (the
    study starts its arms from the same run, so both measure the same start)."""
    from bench.shapes.assets import holdout_of
    from bench.shapes.pipeline import captions_beside, data_name, ensure_captions, train_adapter

    cache = cache_dir()
    n_train = 64 if quick else 8000
    heldout = holdout_of(assets)  # the training scenes' captions, of the split the base was trained around
    captions = ensure_captions(captions_beside(cache / data_name(n_train, heldout)), n=n_train, heldout=heldout)
    seeded = f"-s{seed}" if seed else ""  # seed 0 keeps the cache folder it always had
    run = cache / f"demo-distill-{run_key(assets, 0, steps)}{seeded}{'-quick' if quick else ''}"
    flags = ("--batch-size", "4", "--set", "optim.lr=2e-3") if quick else DISTILL_FLAGS
    return train_adapter(assets, captions, run, preset="distill", seed=seed, max_steps=steps, extra=flags, quiet=quiet)


def by_group(metrics: dict[int, dict], check: str = "binding") -> dict[str, dict]:
    """{group: {values, teacher, adapter}}: one check's mean over [seeds, prompts] per group of prompts, grouped by
    scene kind and by whether the caption names one of the held-out split's colour-shape pairings (never drawn by
    the base in the "pairings" design, drawn only alone in the "scenes" design).

    Separates what the text side decides from what the UNet can draw: a "white triangle" alone needs no binding
    from the text, so its score says what the base can draw of that pairing. The check must apply to every prompt
    (binding, colour, shape, no_extra, overall), so its per-prompt list follows the prompts' order."""
    from bench.shapes.captions import parse_caption
    from bench.shapes.scenes import split_prompts
    from bench.shapes.splits import holdout_named

    first = next(iter(metrics.values()))
    teacher, ours = list(first["arms"])
    heldout = holdout_named(first.get("holdout", "pairings"))
    prompts = split_prompts(first.get("split", "heldout"), first["prompts"], heldout=heldout)
    novel_words, drawn_words = (("a held-out pairing (trained alone)", "no held-out pairing") if heldout.drawn_alone
                                else ("a never-drawn colour-shape pairing", "all its pairings drawn"))
    groups: dict[str, dict[str, list]] = {}
    for m in metrics.values():
        for arm, role in ((teacher, "teacher"), (ours, "adapter")):
            values = m["per_prompt"][arm][check]
            if len(values) != len(prompts):
                raise ValueError(f"{check} scores {len(values)} of {len(prompts)} prompts; by_group needs a check that "
                                 "applies to every prompt (binding, colour, shape, no_extra, overall)")
            for prompt, value in zip(prompts, values):
                spec = parse_caption(prompt)
                novel = any((o.colour, o.shape) in heldout.colour_shapes for o in spec.objects)
                name = f"{spec.kind}, {novel_words if novel else drawn_words}"
                groups.setdefault(name, {"teacher": [], "adapter": []})[role].append(value)
    return {name: {"values": len(g["adapter"]), "teacher": sum(g["teacher"]) / len(g["teacher"]),
                   "adapter": sum(g["adapter"]) / len(g["adapter"])} for name, g in sorted(groups.items())}


def recipe(distill_steps: int, steps: int) -> str:
    """The training recipe in words, for the report."""
    parts = ([f"{distill_steps} steps of caption-only distillation onto the teacher's contexts (`--preset distill`)"]
             if distill_steps else [])
    if steps:
        parts.append(f"{steps} steps of the `dynamic-kl` image stage" + (
            f" from the distilled adapter (`--init-adapter`, {' '.join(FINE_TUNE_FLAGS)})" if distill_steps else ""))
    return ", then ".join(parts)


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m bench.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--assets", type=Path, default=Path("assets/shapes"))
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--prompts", type=int, default=100, help="prompts to score (default 100)")
    parser.add_argument("--split", choices=("heldout", "val"), default="heldout",
                        help="score held-out prompts (default: combinations never seen in training) or in-distribution "
                             "val prompts (every combination seen; what the base can draw)")
    parser.add_argument("--distill-steps", type=int, default=DISTILL_STEPS,
                        help=f"caption-only distillation steps first (default {DISTILL_STEPS}; 0 = none)")
    parser.add_argument("--steps", type=int, default=IMAGE_STEPS,
                        help=f"dynamic-kl image-stage steps after distillation (default {IMAGE_STEPS}; without "
                             "distillation, what the adapter trains)")
    parser.add_argument("--seed", type=int, default=0, help="training seed and sampling-noise seed (default 0)")
    parser.add_argument("--sampler-steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--quick", action="store_true", help="miniature untrained assets and a few steps (tests only)")
    args = parser.parse_args(argv)
    if args.distill_steps < 0 or args.steps < 0 or args.distill_steps + args.steps == 0:
        parser.error("--distill-steps and --steps must be >= 0, and one of them > 0")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    import torch
    from tqdm.auto import tqdm

    from bench.shapes import evaluate as ev
    from bench.shapes.assets import ensure_assets, holdout_of, teacher_kind
    from bench.shapes.pipeline import data_name, ensure_train_data, train_adapter
    from bench.shapes.report import comparison_grid, markdown_table
    from bench.shapes.scenes import split_prompts
    from bench.shapes.stats import mean_ci, paired_ci

    torch.set_num_threads(1)  # see bench/shapes/assets.py: one thread is fastest for these tiny models
    start = time.perf_counter()
    stages = tqdm(total=5, desc="demo", position=0, dynamic_ncols=True)
    stages.set_postfix_str("assets")
    assets = ensure_assets(args.assets, quick=args.quick)
    stages.update(1)

    stages.set_postfix_str("training data")
    cache = cache_dir()
    n_train = 64 if args.quick else 8000
    quick = "-quick" if args.quick else ""
    heldout = holdout_of(assets)
    data = ensure_train_data(cache / data_name(n_train, heldout), n=n_train, heldout=heldout) if args.steps else None
    stages.update(1)

    run = None
    seeded = f"-s{args.seed}" if args.seed else ""  # seed 0 keeps the cache folders it always had
    if args.distill_steps:
        stages.set_postfix_str("distilling the teacher's contexts (captions only)")
        run = distill(assets, args.seed, args.distill_steps, quick=args.quick)
    if args.steps:
        stages.set_postfix_str("training the adapter (dynamic-kl)")
        init = ("--init-adapter", str(run / "adapter.safetensors"), *FINE_TUNE_FLAGS) if run is not None else ()
        run = cache / f"demo-{run_key(assets, args.steps, args.distill_steps)}{seeded}{quick}"
        extra = (("--batch-size", "4") if args.quick else ()) + init
        train_adapter(assets, data, run, preset="dynamic-kl", seed=args.seed, max_steps=args.steps, extra=extra)
    stages.update(1)

    stages.set_postfix_str(f"sampling and scoring {args.prompts} {PROMPT_KINDS[args.split]}")
    from adapter import load_adapter

    base, llm = ev.load_base_and_llm(assets)
    adapter = load_adapter(run / "adapter.safetensors")
    prompts = split_prompts(args.split, args.prompts, heldout=heldout)
    kind = teacher_kind(assets)
    arms = {f"teacher ({kind})": ev.teacher_conditioning(base), "adapter (tiny LM, all layers)": ev.adapter_conditioning(adapter, llm)}
    images, checks = {}, {}
    for name, conditioning in arms.items():
        images[name], checks[name] = ev.alignment(base, conditioning, prompts, args.sampler_steps, args.guidance,
                                                  seed=args.seed, desc=f"sampling: {name}")
    triplets = ev.make_triplets(base, n=64 if args.quick else 256, heldout=heldout)
    mse = {name: float(ev.eps_mse(base, conditioning, triplets).mean()) for name, conditioning in arms.items()}
    mse_empty = float(ev.eps_mse(base, ev.empty_conditioning(base), triplets).mean())
    stages.update(1)

    stages.set_postfix_str("writing")
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    teacher, ours = list(arms)
    gain = ev.recovered_gain(mse[ours], mse[teacher], mse_empty)
    metrics_gain = {"recovered_gain": gain}
    names = [k for k in ev.summarize_checks(checks[ours]) if k != "n"]
    metrics = {"prompts": len(prompts), "split": args.split, "holdout": heldout.name, "sampler": {"name": "DDIM", "steps": args.sampler_steps, "guidance": args.guidance},
               "adapter_run": str(run), "train_timings": json.loads((run / "timings.json").read_text())["wall_s"],
               "eps_mse_val": mse, "eps_mse_val_empty_prompt": mse_empty, "arms": {}}
    rows = []
    for check in names:
        values = {a: [[c[check] for c in checks[a] if check in c]] for a in arms}
        for a in arms:
            metrics["arms"].setdefault(a, {})[check] = mean_ci(values[a])
            # per prompt (those the check applies to), so runs of several seeds can be pooled (bench/demo_seeds.py)
            metrics.setdefault("per_prompt", {}).setdefault(a, {})[check] = values[a][0]
        diff = paired_ci(values[ours], values[teacher])
        rows.append([check, int(len(values[ours][0])), metrics["arms"][teacher][check][0],
                     metrics["arms"][ours][check][0], f"{diff[0]:+.3f} [{diff[1]:+.3f}, {diff[2]:+.3f}]"])
        metrics.setdefault("adapter_minus_teacher", {})[check] = diff
    comparison_grid(out / "samples.png", prompts[:GRID_PROMPTS], {"teacher": images[teacher][:GRID_PROMPTS],
                                                                   "adapter": images[ours][:GRID_PROMPTS]})
    seconds = time.perf_counter() - start
    metrics.update(metrics_gain)
    metrics["seconds"] = round(seconds, 1)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    report = [
        "# make demo: the shapes benchmark on this machine", "",
        f"An adapter for a tiny decoder-only LM ({assets / 'tiny-lm'}) trained with {recipe(args.distill_steps, args.steps)} "
        f"on the frozen tiny base model, against that base model's own text encoder, a {kind} "
        f"(the weak teacher). {len(prompts)} {PROMPT_KINDS[args.split]}"
        f"{SCENES_HOLDOUT_WORDS if heldout.drawn_alone else ''}, "
        f"one image each, DDIM {args.sampler_steps} steps, guidance {args.guidance}, the same noise for both. "
        "Accuracy per check of the exact scorer; the difference has a 95% bootstrap interval over prompts "
        "(one training seed: the full study, `make bench-shapes`, adds seeds).", "",
        markdown_table(["check", "prompts", "teacher", "adapter", "adapter - teacher [95% CI]"], rows), "",
        f"Validation epsilon-MSE (unweighted, {len(triplets.captions)} fixed val triplets): teacher "
        f"{mse[teacher]:.5f}, adapter {mse[ours]:.5f}, the empty prompt {mse_empty:.5f}: recovered gain "
        f"R = (L_empty - L_adapter) / (L_empty - L_teacher) = {gain:.3f} (1 = the teacher's level, 0 = no better than "
        "the empty prompt).", "",
        "Binding by group of prompts: compare teacher and adapter within a row. " + (
            "In this holdout the base drew every held-out pairing in training, alone only, so a two-object row asks "
            "the text side for binding." if heldout.drawn_alone else
            "The base draws a colour-shape pairing it never drew in training (the held-out split's) right far less "
            "often, whatever the text says (docs/shapes_oracle_probe.md)."), "",
        markdown_table(["group of prompts", "prompts", "teacher", "adapter"],
                       [[name, g["values"], g["teacher"], g["adapter"]]
                        for name, g in by_group({args.seed: metrics}).items()]), "",
        "![teacher | adapter](samples.png)", "",
        f"Run: {seconds / 60:.1f} min in all. Adapter run (reused when unchanged): `{run}`.", ""]
    (out / "report.md").write_text("\n".join(report), encoding="utf-8")
    stages.update(1)
    stages.close()
    print(f"outputs in {out.resolve()}: samples.png, metrics.json, report.md ({seconds / 60:.1f} min)")
    return out


if __name__ == "__main__":
    main()
