"""Measure a conditioning on the shapes benchmark: alignment of sampled images, and validation epsilon-MSE.

Two measurements that do not depend on any loss weighting (docs/design.md section 5), so every arm of the
study is compared on the same ruler:

- `alignment`: sample each prompt once with the trainer's own sampler (training/sampling.py: DDIM with
  classifier-free guidance against the empty prompt, the same initial noise for every arm), score each
  image against its caption (scorer.py); per-prompt checks are kept so that confidence intervals can be
  paired across arms.
- `eps_mse`: unweighted epsilon-MSE of the frozen UNet under the conditioning, on fixed
  (x0, t, noise) triplets from the val split (x0 = the VAE latents of true renders), t spread evenly over
  0..999. Lower is better; it is what "validation loss" means here, identical for every weighting.
- `recovered_gain`: R = (L_empty - L_adapter) / (L_empty - L_teacher) from three `eps_mse` means on the same
  triplets, L_empty being the teacher's loss with the empty prompt (`empty_conditioning`). The frozen UNet's
  loss moves little between saying nothing and the teacher's best, so R puts an adapter on a 0-to-1 ruler:
  R = 1 is the teacher's level.

The teacher is the base model's own frozen text encoder (the shipped base's toy CLIP, or the bag of words of
assets/shapes-bow); an adapter conditions the same frozen UNet from the tiny LM's states. Everything runs on the CPU in fp32.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .scenes import IMAGE_SIZE, generate
from .scorer import score
from .splits import HELDOUT, HeldOut

__all__ = ["Triplets", "alignment", "eps_mse", "make_triplets", "adapter_conditioning", "teacher_conditioning",
           "empty_conditioning", "recovered_gain"]

# conditioning(prompts) -> context_at(t) -> (context [len(prompts), N, C], pooled or None)
Conditioning = Callable[[list[str]], Callable]


def teacher_conditioning(base) -> Conditioning:
    """The weak teacher: the base model's own text encoder (a toy CLIP or a bag of words), fixed over t."""
    def conditioning(prompts: list[str]):
        context, pooled = base.encode_clip(prompts, "cpu")
        return lambda t: (context, pooled)
    return conditioning


def empty_conditioning(base) -> Conditioning:
    """The teacher on the empty prompt for every caption: a conditioning that says nothing (R = 0)."""
    teacher = teacher_conditioning(base)

    def conditioning(prompts: list[str]):
        return teacher([""] * len(prompts))
    return conditioning


def recovered_gain(adapter_loss: float, teacher_loss: float, empty_loss: float) -> float:
    """R = (L_empty - L_adapter) / (L_empty - L_teacher): the share of the teacher's gain over the empty prompt
    that a conditioning recovers, on the same validation triplets. 1 = the teacher's loss, 0 = no better than
    saying nothing, negative = worse than the empty prompt; above 1 = better than the teacher. NaN when the
    teacher is no better than the empty prompt (an untrained base model, or too few triplets): R is undefined."""
    gap = empty_loss - teacher_loss
    return (empty_loss - adapter_loss) / gap if gap > 0 else float("nan")


def adapter_conditioning(adapter, llm) -> Conditioning:
    """An adapter over the tiny LM, through the trainer's own code path (timestep-aware adapters follow t)."""
    from training.conditioning import adapter_context_at

    def conditioning(prompts: list[str]):
        return adapter_context_at(adapter.eval(), llm, prompts)
    return conditioning


@torch.no_grad()
def alignment(base, conditioning: Conditioning, prompts: list[str], steps: int = 25, guidance: float = 4.0,
              seed: int = 0, batch_size: int = 50, desc: str = "") -> tuple[np.ndarray, list[dict[str, bool]]]:
    """(uint8 images [n, H, W, 3], per-prompt scorer checks). Batch b of the prompts uses seed + b.
    With `desc`, a progress bar over the batches says what is being sampled."""
    from tqdm.auto import tqdm

    from training.sampling import ddim_sample

    images, checks = [], []
    starts = range(0, len(prompts), batch_size)
    for b, i in enumerate(tqdm(starts, desc=desc, leave=False, disable=not desc, dynamic_ncols=True)):
        chunk = prompts[i:i + batch_size]
        context_at = conditioning(chunk + [""] * len(chunk))
        out = ddim_sample(base, context_at, len(chunk), (IMAGE_SIZE, IMAGE_SIZE), steps, guidance, seed + b).numpy()
        images.append(out)
        checks += [score(image, prompt).checks for image, prompt in zip(out, chunk)]
    return np.concatenate(images), checks


@dataclass
class Triplets:
    """Fixed validation triplets: latents x0 (scaled), timesteps t, noise, and the captions of x0."""

    x0: torch.Tensor
    t: torch.Tensor
    noise: torch.Tensor
    captions: list[str]


@torch.no_grad()
def make_triplets(base, n: int = 256, seed: int = 1234, split: str = "val", heldout: HeldOut = HELDOUT) -> Triplets:
    """n triplets from `split` scenes; t evenly spaced over the schedule so every noise level counts equally."""
    samples = generate(split, n, seed, heldout)
    pixels = torch.from_numpy(np.stack([s.image for s in samples])).permute(0, 3, 1, 2).float() / 127.5 - 1
    x0 = torch.cat([base.encode_images(pixels[i:i + 64]).float() for i in range(0, n, 64)])
    t = torch.linspace(0, base.scheduler.config.num_train_timesteps - 1, n).round().long()
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    return Triplets(x0, t, noise, [s.caption for s in samples])


@torch.no_grad()
def eps_mse(base, conditioning: Conditioning, triplets: Triplets, batch_size: int = 64) -> np.ndarray:
    """Per-triplet unweighted epsilon-MSE of the frozen UNet conditioned by `conditioning`."""
    errors = []
    for i in range(0, len(triplets.captions), batch_size):
        x0, t, noise = (v[i:i + batch_size] for v in (triplets.x0, triplets.t, triplets.noise))
        x_t = base.scheduler.add_noise(x0, noise, t)
        context, pooled = conditioning(triplets.captions[i:i + batch_size])(t)
        eps = base.predict_eps(x_t, t, context, pooled, None).float()
        errors.append((eps - noise).pow(2).mean(dim=(1, 2, 3)))
    return torch.cat(errors).numpy()


def load_base_and_llm(assets: str | Path):
    """The frozen tiny base (training.models.BaseModel) and tiny LM (adapter.LoadedLLM) of an assets folder."""
    from adapter import load_llm
    from training.models import load_base_model

    from .assets import BASE_FOLDER, LM_FOLDER

    assets = Path(assets)
    return load_base_model(str(assets / BASE_FOLDER)), load_llm(assets / LM_FOLDER)


def summarize_checks(checks: list[dict[str, bool]]) -> dict[str, float]:
    """Accuracy per check over the prompts it applies to (the scorer's summarize, from check dicts)."""
    names = sorted({k for c in checks for k in c}, key=lambda k: (k == "overall", k))
    return {"n": float(len(checks)), **{k: float(np.mean([c[k] for c in checks if k in c])) for k in names}}


