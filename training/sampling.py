"""The sampler shared by the trainer's validation images and the shapes benchmark: DDIM with classifier-free guidance.

One function so that every image we score, the teacher's and the adapter's alike, comes from the same
sampler, the same initial noise and the same guidance rule; only the conditioning differs. The
conditioning is a callable `context_at(t)` returning (context, pooled) for the positive prompts
followed by their negatives ([2n, ...]), so a timestep-aware adapter can be re-evaluated at every
sampler timestep while a fixed context (CLIP, a static adapter) just returns the same tensors.

    images = ddim_sample(base, lambda t: (context, None), n=4, size=(64, 64), steps=25, guidance=4.0, seed=0)
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

ContextAt = Callable[[torch.Tensor], "tuple[torch.Tensor, Optional[torch.Tensor]]"]


@torch.no_grad()
def ddim_sample(base, context_at: ContextAt, n: int, size: tuple[int, int], steps: int, guidance: float, seed: int,
                device="cpu") -> torch.Tensor:
    """n images as uint8 [n, H, W, 3] (CPU), from noise drawn by a CPU generator seeded with `seed`.

    `base` is a training.models.BaseModel. Guidance: eps = uncond + guidance * (cond - uncond)."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(base.scheduler.config, prediction_type="epsilon")  # we predict eps
    scheduler.set_timesteps(steps)
    width, height = size
    factor = base.vae_factor
    gen = torch.Generator().manual_seed(seed)
    latents = torch.randn(n, base.unet.config.in_channels, height // factor, width // factor, generator=gen).to(device)
    latents = latents * scheduler.init_noise_sigma
    sizes = torch.tensor([[height, width, 0, 0, height, width]] * (2 * n), device=device, dtype=torch.float32)
    unet_dtype = base.unet.dtype
    for t in scheduler.timesteps:
        context, pooled = context_at(t)
        x = torch.cat([latents, latents]).to(unet_dtype)
        eps = base.predict_eps(x, t.expand(2 * n).to(device), context.to(unet_dtype),
                               None if pooled is None else pooled.to(unet_dtype), sizes).float()
        cond, uncond = eps.chunk(2)
        latents = scheduler.step(uncond + guidance * (cond - uncond), t, latents).prev_sample
    pixels = base.decode_latents(latents).float().clamp(-1, 1)
    return ((pixels + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()
