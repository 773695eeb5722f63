"""The demo's recipe at several seeds, pooled: is the adapter's difference from its teacher more than one seed's luck?

    python -m bench.demo_seeds [--assets assets/shapes] [--seeds 0 1 2] [--split heldout] [--out outputs/demo-seeds]

Runs `python -m bench.demo --seed s --out <out>/s<s>` for every seed (its training runs are cached, so a seed the
demo already trained only samples again; a seed whose metrics.json for that split is there is read back), then pools: per check,
adapter minus teacher with a paired bootstrap 95% interval resampling both seeds and prompts (bench/shapes/stats.py),
and R per seed. Each seed samples its own noise, so the seeds differ in training and in sampling. Written to
<out>/results.md and results.json.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

__all__ = ["pool"]


def pool(metrics: dict[int, dict]) -> dict:
    """{check: (mean, low, high) of adapter - teacher} over [seeds, prompts], plus R and the arm names.
    `metrics`: each seed's metrics.json (bench.demo), all with the same prompts."""
    from bench.shapes.stats import mean_ci, paired_ci

    first = next(iter(metrics.values()))
    teacher, ours = list(first["arms"])
    checks = list(first["per_prompt"][ours])
    values = lambda arm, check: [m["per_prompt"][arm][check] for m in metrics.values()]  # noqa: E731
    return {
        "seeds": list(metrics), "teacher": teacher, "adapter": ours, "prompts": first["prompts"],
        "split": first.get("split", "heldout"), "holdout": first.get("holdout", "pairings"),
        "recovered_gain": [m["recovered_gain"] for m in metrics.values()],
        "checks": {check: {"prompts": len(first["per_prompt"][ours][check]),
                           "teacher": mean_ci(values(teacher, check))[0], "adapter": mean_ci(values(ours, check))[0],
                           "adapter_minus_teacher": paired_ci(values(ours, check), values(teacher, check))}
                   for check in checks},
    }


def results_markdown(pooled: dict, command: str) -> str:
    from bench.shapes.report import markdown_table

    rows = [[check, str(c["prompts"]), f"{c['teacher']:.3f}", f"{c['adapter']:.3f}",
             "{:+.3f} [{:+.3f}, {:+.3f}]".format(*c["adapter_minus_teacher"])] for check, c in pooled["checks"].items()]
    gains = ", ".join(f"{g:.3f}" for g in pooled["recovered_gain"])
    return (f"`{command}`: {pooled['adapter']} against {pooled['teacher']}, seeds "
            f"{', '.join(map(str, pooled['seeds']))}, {pooled['prompts']} {'held-out' if pooled['split'] == 'heldout' else 'val'} "
            f"prompts per seed ({pooled.get('holdout', 'pairings')} holdout); the interval "
            f"resamples seeds and prompts.\n\n"
            + markdown_table(["check", "prompts per seed", "teacher", "adapter", "adapter - teacher [95% CI]"], rows)
            + f"\n\nRecovered gain R per seed: {gains}.\n"
            + (f"\n{pooled['by_group_check']} by group of prompts (seeds x prompts pooled):\n\n" + markdown_table(
                ["prompts", "values", "teacher", "adapter"],
                [[name, str(g["values"]), f"{g['teacher']:.3f}", f"{g['adapter']:.3f}"]
                 for name, g in pooled["by_group"].items()]) + "\n" if pooled.get("by_group") else ""))


def main(argv: list[str] | None = None) -> dict:
    from bench import demo

    parser = argparse.ArgumentParser(prog="python -m bench.demo_seeds", description=__doc__.split("\n\n")[0])
    parser.add_argument("--assets", type=Path, default=Path("assets/shapes"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--split", choices=("heldout", "val"), default="heldout",
                        help="the prompts every seed scores (bench.demo --split)")
    parser.add_argument("--out", type=Path, default=Path("outputs/demo-seeds"))
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    seeds = list(dict.fromkeys(args.seeds))
    if len(seeds) < 2:
        parser.error("--seeds: pooling needs at least two seeds (a single one is `python -m bench.demo --seed S`)")
    from bench.shapes.assets import holdout_of

    holdout = holdout_of(args.assets, if_missing="pairings").name
    metrics = {}
    for seed in seeds:
        folder = args.out / f"s{seed}"
        path = folder / "metrics.json"
        found = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        if not ("per_prompt" in found and (found.get("split", "heldout"), found.get("holdout", "pairings"))
                == (args.split, holdout)):
            demo.main(["--assets", str(args.assets), "--seed", str(seed), "--split", args.split, "--out", str(folder)])
            found = json.loads(path.read_text(encoding="utf-8"))
        metrics[seed] = found
    pooled = pool(metrics)
    pooled.update(by_group_check="binding", by_group=demo.by_group(metrics, "binding"))
    text = results_markdown(pooled, " ".join(["python -m bench.demo_seeds", *argv]))
    (args.out / "results.json").write_text(json.dumps(pooled, indent=2) + "\n", encoding="utf-8")
    (args.out / "results.md").write_text(text, encoding="utf-8")
    print(text)
    return pooled


if __name__ == "__main__":
    main()
