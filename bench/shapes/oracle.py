"""The oracle bound of a frozen base UNet: the best alignment any conditioning can buy from it.

    python -m bench.shapes.oracle [--assets assets/shapes] [--captions 16] [--steps 300] [--lr 1e-2] [--batch 16]
                                  [--renders 32] [--samples 8] [--out outputs/shapes-oracle]

For N held-out two-object captions (pair and relation scenes, where binding and relations are asserted),
the 77 x C context tensor itself is optimised against the frozen UNet: Adam on the unweighted epsilon-MSE
of fresh renders of that caption's scene (`--renders` layouts per caption, encoded once by the VAE; every
step draws `--batch` of them with new noise and a uniform t), starting from the teacher's context. Every
caption's context only receives gradient from its own renders, and Adam's step is per element, so
optimising all captions in one batch is N independent optimisations done at once.

Then teacher and oracle contexts are sampled with the benchmark's own sampler (evaluate.alignment: DDIM,
guidance against the teacher's empty prompt) from the same noise, `--samples` images per caption, and
scored by the exact scorer. Each caption's score is its mean over its samples; the table gives per check
the teacher, the oracle and oracle - teacher with percentile-bootstrap 95% CIs over captions (stats.py).
A check that applies to some captions only (relation) is averaged over those. Written to --out:
results.md, results.json (per-caption values included) and contexts.safetensors (the optimised contexts
[captions, 77, C], in the order of results.json's captions).
No adapter can beat this bound on this UNet, since an adapter only produces a context; where the bound is
near the teacher, the UNet itself (what it learnt to read) caps the score, not the text side.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

__all__ = ["OracleConfig", "caption_latents", "fixed_batch_eps", "oracle_captions", "optimise_contexts",
           "run_oracle", "validate"]

logger = logging.getLogger(__name__)

TWO_OBJECT_KINDS = ("pair", "relation")


@dataclass(frozen=True)
class OracleConfig:
    captions: int = 16
    kinds: tuple[str, ...] = TWO_OBJECT_KINDS
    steps: int = 300
    lr: float = 1e-2
    batch: int = 16  # renders per caption per step
    renders: int = 32  # distinct layouts per caption, encoded once
    samples: int = 8  # images per caption, each from its own noise seed
    sampler_steps: int = 25
    guidance: float = 4.0
    seed: int = 0
    holdout: str = "pairings"  # the assets' (bench/shapes/assets.holdout_of): which captions are held out


def validate(config: OracleConfig) -> None:
    """ValueError naming the bad field and what it must be."""
    from .captions import KINDS

    for name in ("captions", "steps", "batch", "renders", "samples", "sampler_steps"):
        if getattr(config, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(config, name)}")
    if not config.lr > 0:
        raise ValueError(f"--lr must be positive, got {config.lr}")
    if not config.kinds or any(k not in KINDS for k in config.kinds):
        raise ValueError(f"--kinds must name scene kinds from {KINDS}, got {list(config.kinds)}")


def oracle_captions(n: int, kinds: tuple[str, ...] = TWO_OBJECT_KINDS, seed: int = 0,
                    holdout: str = "pairings") -> list[str]:
    """The first n held-out captions (scenes.heldout_prompts order, distinct specs) of the given kinds."""
    from .captions import parse_caption
    from .scenes import heldout_prompts
    from .splits import holdout_named

    pool = 4 * n
    while True:
        try:
            prompts = heldout_prompts(pool, seed, holdout_named(holdout))
        except ValueError:
            raise ValueError(f"the held-out split has fewer than {n} distinct {'/'.join(kinds)} captions; "
                             f"ask for fewer with --captions") from None
        chosen = [p for p in prompts if parse_caption(p).kind in kinds]
        if len(chosen) >= n:
            return chosen[:n]
        pool *= 2


@torch.no_grad()
def caption_latents(base, captions: list[str], renders: int, seed: int = 0) -> torch.Tensor:
    """[N, renders, c, h, w] scaled VAE latents of fresh layouts of each caption's scene (scenes.layout)."""
    from .captions import parse_caption
    from .scenes import layout, render

    out = []
    for i, caption in enumerate(captions):
        spec = parse_caption(caption)
        images = [render(layout(spec, np.random.default_rng([seed, 17, i, r]))) for r in range(renders)]
        pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
        out.append(base.encode_images(pixels).float())
    return torch.stack(out)


def fixed_batch_eps(base, contexts: torch.Tensor, latents: torch.Tensor, t: torch.Tensor,
                    noise: torch.Tensor) -> torch.Tensor:
    """Per-caption epsilon-MSE [N] on fixed (x0, t, noise): latents, t and noise are [N, R, ...] / [N, R]."""
    n, r = latents.shape[:2]
    x0, noise, t = latents.flatten(0, 1), noise.flatten(0, 1), t.flatten()
    x_t = base.scheduler.add_noise(x0, noise, t)
    eps = base.predict_eps(x_t, t, contexts.repeat_interleave(r, dim=0), None, None).float()
    return (eps - noise).pow(2).mean(dim=(1, 2, 3)).view(n, r).mean(dim=1)


def optimise_contexts(base, start: torch.Tensor, latents: torch.Tensor, steps: int, lr: float, batch: int,
                      generator: torch.Generator, log_every: int = 50) -> tuple[torch.Tensor, list[float]]:
    """Adam on the contexts [N, T, C] (UNet frozen) against eps-MSE of each caption's own latents; returns the
    optimised contexts and the loss of every step."""
    for p in base.unet.parameters():
        p.requires_grad_(False)
    contexts = start.detach().clone().float().requires_grad_(True)
    optimizer = torch.optim.Adam([contexts], lr=lr)
    n, renders = latents.shape[:2]
    steps_total = base.scheduler.config.num_train_timesteps
    losses = []
    for step in range(steps):
        picks = torch.randint(renders, (n, batch), generator=generator)
        x0 = latents[torch.arange(n)[:, None], picks]
        t = torch.randint(steps_total, (n, batch), generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        loss = fixed_batch_eps(base, contexts, x0, t, noise).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if log_every and (step % log_every == 0 or step == steps - 1):
            logger.info("oracle step %d/%d eps-MSE %.5f", step + 1, steps, losses[-1])
    return contexts.detach(), losses


def _per_caption(checks: list[dict[str, bool]], n: int) -> dict[str, np.ndarray]:
    """{check: [1, captions it applies to] per-caption means over samples}; sample k of caption i is
    checks[k * n + i]. Whether a check applies depends on the caption only (the scorer's rules), so both
    arms keep the same captions and stay paired."""
    names = sorted({k for c in checks for k in c}, key=lambda k: (k == "overall", k))
    out = {}
    for name in names:
        per = [[c[name] for c in checks[i::n] if name in c] for i in range(n)]
        out[name] = np.array([[float(np.mean(p)) for p in per if p]])
    return out


def run_oracle(base, config: OracleConfig) -> dict:
    """Optimise, sample, score; returns a JSON-able result (see the module docstring)."""
    from .evaluate import alignment
    from .stats import mean_ci, paired_ci

    validate(config)
    captions = oracle_captions(config.captions, config.kinds, config.seed, config.holdout)
    generator = torch.Generator().manual_seed(config.seed)
    started = time.perf_counter()
    latents = caption_latents(base, captions, config.renders, config.seed)
    teacher_context = base.encode_clip(captions, "cpu")[0].float()
    empty_context = base.encode_clip([""], "cpu")[0].float()
    # a fixed held-aside batch (its own generator) shows what the optimisation did to the objective
    fixed = torch.Generator().manual_seed(config.seed + 1)
    fixed_t = torch.randint(base.scheduler.config.num_train_timesteps, latents.shape[:2], generator=fixed)
    fixed_noise = torch.randn(latents.shape, generator=fixed)
    with torch.no_grad():
        before = fixed_batch_eps(base, teacher_context, latents, fixed_t, fixed_noise)
    oracle_context, losses = optimise_contexts(base, teacher_context, latents, config.steps, config.lr, config.batch,
                                               generator)
    with torch.no_grad():
        after = fixed_batch_eps(base, oracle_context, latents, fixed_t, fixed_noise)
    optimise_seconds = time.perf_counter() - started

    def conditioning_from(table: torch.Tensor):
        index = {c: i for i, c in enumerate(captions)}

        def conditioning(prompts: list[str]):
            context = torch.stack([table[index[p]] if p else empty_context[0] for p in prompts])
            return lambda t: (context, None)
        return conditioning

    prompts = [c for _ in range(config.samples) for c in captions]  # batch k = sample k of every caption
    per_arm = {}
    for arm, table in (("teacher", teacher_context), ("oracle", oracle_context)):
        _, checks = alignment(base, conditioning_from(table), prompts, config.sampler_steps, config.guidance,
                              seed=config.seed, batch_size=len(captions), desc=f"sampling {arm}")
        per_arm[arm] = _per_caption(checks, len(captions))
    names = [k for k in per_arm["teacher"] if k in per_arm["oracle"]]
    return {
        "config": {**config.__dict__, "kinds": list(config.kinds)},
        "captions": captions,
        "eps_mse_fixed_batch": {"teacher": float(before.mean()), "oracle": float(after.mean())},
        "loss_first_last": [losses[0], float(np.mean(losses[-max(1, len(losses) // 10):]))],
        "optimise_seconds": round(optimise_seconds, 1),
        "teacher": {k: mean_ci(per_arm["teacher"][k]) for k in names},
        "oracle": {k: mean_ci(per_arm["oracle"][k]) for k in names},
        "oracle_minus_teacher": {k: paired_ci(per_arm["oracle"][k], per_arm["teacher"][k]) for k in names},
        "per_caption": {arm: {k: v[0].tolist() for k, v in checks.items()} for arm, checks in per_arm.items()},
        "contexts": oracle_context.contiguous(),  # [captions, T, C], in caption order; main() saves it
    }


def results_markdown(result: dict) -> str:
    from .report import markdown_table

    cfg = result["config"]
    fmt = lambda m, sign="": f"{m[0]:{sign}.3f} [{m[1]:{sign}.3f}, {m[2]:{sign}.3f}]"  # noqa: E731
    rows = [[k, len(result["per_caption"]["teacher"][k]), fmt(result["teacher"][k]), fmt(result["oracle"][k]),
             fmt(result["oracle_minus_teacher"][k], "+")] for k in result["teacher"]]
    eps = result["eps_mse_fixed_batch"]
    return "\n".join([
        f"{cfg['captions']} held-out {'/'.join(cfg['kinds'])} captions x {cfg['samples']} samples (DDIM "
        f"{cfg['sampler_steps']}, guidance {cfg['guidance']}, same noise); contexts optimised {cfg['steps']} steps "
        f"(Adam lr {cfg['lr']}, batch {cfg['batch']} of {cfg['renders']} renders per caption) in "
        f"{result['optimise_seconds']:.0f} s. Mean [95% bootstrap CI over captions].", "",
        f"eps-MSE on a fixed held-aside batch: teacher {eps['teacher']:.5f}, oracle {eps['oracle']:.5f}", "",
        markdown_table(["check", "captions", "teacher", "oracle", "oracle - teacher"], rows)]) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.shapes.oracle", description=__doc__.split("\n\n")[0])
    defaults = OracleConfig()
    parser.add_argument("--assets", type=Path, default=Path("assets/shapes"))
    parser.add_argument("--out", type=Path, default=Path("outputs/shapes-oracle"),
                        help="results.json and results.md are written here")
    parser.add_argument("--captions", type=int, default=defaults.captions)
    parser.add_argument("--kinds", nargs="+", default=list(defaults.kinds), help="scene kinds of the captions")
    parser.add_argument("--steps", type=int, default=defaults.steps, help="Adam steps on the contexts")
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--batch", type=int, default=defaults.batch, help="renders per caption per step")
    parser.add_argument("--renders", type=int, default=defaults.renders, help="distinct layouts per caption")
    parser.add_argument("--samples", type=int, default=defaults.samples, help="images per caption")
    parser.add_argument("--sampler-steps", type=int, default=defaults.sampler_steps)
    parser.add_argument("--guidance", type=float, default=defaults.guidance)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared machine)")
    args = parser.parse_args(argv)
    config = OracleConfig(args.captions, tuple(args.kinds), args.steps, args.lr, args.batch, args.renders,
                          args.samples, args.sampler_steps, args.guidance, args.seed)
    try:
        validate(config)
    except ValueError as error:
        parser.error(str(error))
    if not (args.assets / "manifest.json").is_file():
        parser.error(f"{args.assets} holds no shapes assets (no manifest.json): run `make shapes-assets` first")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    from training.models import load_base_model

    from .assets import BASE_FOLDER, holdout_of

    config = replace(config, holdout=holdout_of(args.assets).name)

    torch.set_num_threads(args.threads)
    base = load_base_model(str(args.assets / BASE_FOLDER))
    result = run_oracle(base, config)
    args.out.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file

    save_file({"oracle": result.pop("contexts")}, str(args.out / "contexts.safetensors"))
    (args.out / "results.json").write_text(json.dumps(result, indent=1), encoding="utf-8")
    text = results_markdown(result)
    (args.out / "results.md").write_text(text, encoding="utf-8")
    print(text)
    print(f"written: {args.out / 'results.md'}, {args.out / 'results.json'}")
    return result


if __name__ == "__main__":
    main()
