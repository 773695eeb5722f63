"""Where an adapter's conditioning stands against the teacher's: validation epsilon-MSE and context statistics.

    python -m bench.shapes.diagnose [--assets assets/shapes] [--split val|heldout] [--alignment N] [--slots]
                                    [ADAPTER ...]

ADAPTER is an exported `adapter.safetensors`, a run folder (its `adapter.safetensors`) or a training
checkpoint folder (`<run>/checkpoints/step-N`, its EMA weights). Rows, all on the same fixed triplets
(evaluate.make_triplets) of val scenes, or with `--split heldout` of held-out scenes (the assets' split: do the
adapter's contexts fit the noise of combinations it never trained on as well as the teacher's?), and the
captions of those triplets:

- teacher       the base model's own text encoder (a toy CLIP or a bag of words)
- empty prompt  that encoder on "" for every caption: a conditioning that says nothing. An adapter whose
                epsilon-MSE is above this row is worse than no prompt at all.
- each ADAPTER  through the trainer's code path (evaluate.adapter_conditioning)

`R` is the recovered gain (evaluate.recovered_gain): 1 for the teacher, 0 for the empty prompt.

Context statistics (over captions, tokens and channels of the [N, C] cross-attention context):
`rms` the context's size; `offset rms` the RMS of the per-channel mean (the part every token shares);
`token std` the spread across the N tokens of one caption (near 0: every token says the same thing).
These are the figures that found the two adapter-initialisation faults (see LLMDiffAdapter.start_at).

`--slots` adds, per adapter, the teacher's context with only one group of the adapter's slots spliced in, so
the cost of each group's error shows as its own R: `[words]` the caption's token slots (after the start
token, before the end-of-text token), `[summary]` the end-of-text slot and the padding after it, which a
causal text encoder such as CLIP fills with summaries of the whole caption (the base tokenizer's count
decides which slot is which). The UNet may not add the groups' costs: both rows against the adapter's own
say whether they do.

`--alignment N` also samples N held-out prompts with each conditioning (DDIM 25, guidance 4, noise seed 0, the
study's settings) and prints the scorer's accuracy per check, with each adapter's difference from the teacher
(95% paired bootstrap interval over prompts).
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# The timestep at which a timestep-aware adapter's context is summarised (static ones ignore it).
STATS_TIMESTEP = 500


def load_any_adapter(path: Path, llm):
    """An adapter from an exported file, a run folder or a training checkpoint folder, checked against `llm`.
    Anything else, or an adapter made for another LLM, exits with the reason."""
    from adapter import load_adapter
    from adapter.errors import AdapterError
    from adapter.foreign.text import check_pairing
    from training.checkpoint import CheckpointError, load_checkpoint_adapter

    if path.is_dir() and (path / "adapter.safetensors").is_file():
        path = path / "adapter.safetensors"
    if not path.exists():
        raise SystemExit(f"error: {path} does not exist")
    try:
        adapter = load_adapter(path).float().eval() if path.is_file() else load_checkpoint_adapter(path)
        check_pairing(adapter.config, llm, path.name)  # ours, or an ELLA / RouWei module with its recorded text side
    except (AdapterError, CheckpointError) as error:
        raise SystemExit(f"error: {path} is neither an adapter .safetensors file, a run folder holding one, nor a "
                         f"training checkpoint folder (<run>/checkpoints/step-N) for this LM: {error}") from error
    return adapter


SLOT_GROUPS = ("words", "summary")


def slot_groups(base, prompts: list[str], slots: int) -> dict:
    """{group: bool [len(prompts), slots]} of SLOT_GROUPS, from the base tokenizer's length of each prompt
    (start token, the words, then end-of-text and padding)."""
    import torch

    ids = base.tokenizers[0](prompts, truncation=True, max_length=slots).input_ids
    lengths = torch.tensor([len(row) for row in ids])
    index = torch.arange(slots)[None, :]
    return {"words": (index >= 1) & (index < lengths[:, None] - 1), "summary": index >= lengths[:, None] - 1}


def spliced(base, teacher, student, group: str):
    """A conditioning: the teacher's context with the student's slots of `group` (the teacher's pooled vector)."""
    import torch

    slots = base.text_encoders[0].config.max_position_embeddings  # the context length encode_clip pads to

    def conditioning(prompts: list[str]):
        teacher_at, student_at = teacher(prompts), student(prompts)
        take = slot_groups(base, prompts, slots)[group][..., None]  # once per prompts, not at every sampler step

        def context_at(t):
            (context, pooled), (student_context, _) = teacher_at(t), student_at(t)
            return torch.where(take, student_context.to(context.dtype), context), pooled
        return context_at
    return conditioning


def context_stats(context) -> dict[str, float]:
    """rms, offset rms and token std of contexts [B, N, C] (see the module docstring)."""
    context = context.float()
    return {"rms": float(context.pow(2).mean().sqrt()),
            "offset_rms": float(context.mean(dim=(0, 1)).pow(2).mean().sqrt()),
            "token_std": float(context.std(dim=1).mean())}


def diagnose(assets: Path, adapters: list[Path], triplets: int = 256, split: str = "val",
             alignment: int = 0, slots: bool = False) -> list[dict]:
    """One row per conditioning: name, eps_mse (on `split` triplets), rms, offset_rms, token_std, and with
    `alignment` N, checks: the scorer's per-prompt checks of N held-out prompts. With `slots`, each adapter's
    row is followed by one per slot group (`--slots`)."""
    import torch

    from . import evaluate as ev
    from .assets import holdout_of
    from .scenes import heldout_prompts

    base, llm = ev.load_base_and_llm(assets)
    heldout = holdout_of(assets)
    data = ev.make_triplets(base, n=triplets, split=split, heldout=heldout)
    teacher = ev.teacher_conditioning(base)
    prompts = heldout_prompts(alignment, heldout=heldout) if alignment else []

    arms = {"teacher": teacher, "empty prompt": ev.empty_conditioning(base)}
    for path in adapters:
        arms[str(path)] = adapter = ev.adapter_conditioning(load_any_adapter(path, llm), llm)
        for group in SLOT_GROUPS if slots else ():
            arms[f"{path} [{group}]"] = spliced(base, teacher, adapter, group)
    rows = []
    with torch.no_grad():
        for name, conditioning in arms.items():
            context, _ = conditioning(data.captions)(torch.full((len(data.captions),), STATS_TIMESTEP))
            rows.append({"name": name, "eps_mse": float(ev.eps_mse(base, conditioning, data).mean()),
                         **context_stats(context)})
            if alignment:
                rows[-1]["checks"] = ev.alignment(base, conditioning, prompts, seed=0)[1]
    for row in rows:
        row["recovered_gain"] = ev.recovered_gain(row["eps_mse"], rows[0]["eps_mse"], rows[1]["eps_mse"])
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="python -m bench.shapes.diagnose", description=__doc__.split("\n\n")[0])
    parser.add_argument("adapters", nargs="*", type=Path, help="adapter files, run folders or checkpoint folders")
    parser.add_argument("--assets", type=Path, default=Path("assets/shapes"))
    parser.add_argument("--triplets", type=int, default=256, help="fixed triplets (default 256, as the study)")
    parser.add_argument("--split", choices=("val", "heldout"), default="val",
                        help="the scenes the triplets come from (default val, as the study and the demo)")
    parser.add_argument("--alignment", type=int, default=0, metavar="N",
                        help="also sample N held-out prompts per conditioning and score them (default 0: off)")
    parser.add_argument("--slots", action="store_true",
                        help="also each adapter's words and summary slots alone in the teacher's context")
    args = parser.parse_args(argv)
    if args.triplets < 1:
        parser.error(f"--triplets must be at least 1, got {args.triplets}")
    if args.alignment < 0:
        parser.error(f"--alignment is a number of prompts (0: off), got {args.alignment}")
    if not (args.assets / "manifest.json").is_file():
        parser.error(f"{args.assets} holds no shapes assets (no manifest.json): run `make shapes-assets` first")
    import torch

    from .report import markdown_table

    torch.set_num_threads(1)
    rows = diagnose(args.assets, args.adapters, args.triplets, args.split, args.alignment, args.slots)
    print(markdown_table(["conditioning", f"{args.split} eps-MSE", "R", "rms", "offset rms", "token std"],
                         [[r["name"], f"{r['eps_mse']:.5f}", f"{r['recovered_gain']:.3f}", f"{r['rms']:.3f}", f"{r['offset_rms']:.3f}",
                           f"{r['token_std']:.3f}"] for r in rows]))
    if args.alignment:
        print(f"\nHeld-out alignment, {args.alignment} prompts (accuracy; adapters: minus the teacher [95% CI]):\n")
        print(alignment_table(rows))
    return rows


def alignment_table(rows: list[dict]) -> str:
    """Accuracy per check of every row, and each adapter's paired difference from the teacher (rows[0])."""
    import numpy as np

    from .report import markdown_table
    from .stats import paired_ci

    checks = sorted({k for c in rows[0]["checks"] for k in c}, key=lambda k: (k == "overall", k))

    def values(row, check):  # the prompts where `check` applies (the same prompts for every row)
        return np.array([c[check] for c in row["checks"] if check in c], dtype=np.float64)

    def cell(row, check):
        mean = values(row, check).mean()
        if row is rows[0] or row["name"] == "empty prompt":
            return f"{mean:.3f}"
        difference = paired_ci(values(row, check), values(rows[0], check))
        return "{:.3f} ({:+.3f} [{:+.3f}, {:+.3f}])".format(mean, *difference)

    return markdown_table(["conditioning", *checks], [[row["name"], *(cell(row, c) for c in checks)] for row in rows])


if __name__ == "__main__":
    main()
