"""Turn adapter (and optional CLIP) tensors into plain ComfyUI CONDITIONING.

The result is `[[context, extras]]` exactly as CLIPTextEncode / CLIPTextEncodeSDXL make it, so
every core conditioning node (Combine, Concat, Average, SetArea, SetTimestepRange, ControlNet
apply) and every sampler handle it unchanged:
- context [1, N, C]: the adapter's tokens times `llm_strength`, and in `concat` mode CLIP's
  tokens times `clip_strength` appended after them (N grows by 77 per CLIP chunk, which keeps it
  a multiple of 77 so ComfyUI still batches it with a CLIP negative in one UNet call);
- extras["pooled_output"]: SDXL's 1280-wide vector, the adapter's blended towards CLIP's by
  `pooled_blend`; for SD1.5 / SD2 (whose UNets ignore it) CLIP's when one is connected;
- extras width/height/crop_w/crop_h/target_width/target_height: SDXL only.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..adapter.timestep_contexts import conditioning_context

SDXL_SIZE_FIELDS = ("width", "height", "crop_w", "crop_h", "target_width", "target_height")


def check_concat_has_clip(concat_clip: bool, clip) -> None:
    """clip_mode 'concat' needs a CLIP: checked before the LLM runs and again where the tokens are joined."""
    if concat_clip and clip is None:
        raise ValueError("clip_mode is 'concat' but no CLIP is connected: connect the checkpoint's CLIP or set clip_mode to 'none'.")


def build_conditioning(
    context: torch.Tensor,
    pooled: Optional[torch.Tensor],
    *,
    clip_context: Optional[torch.Tensor] = None,
    clip_pooled: Optional[torch.Tensor] = None,
    concat_clip: bool = False,
    llm_strength: float = 1.0,
    clip_strength: float = 1.0,
    pooled_blend: float = 0.0,
    sdxl_size: Optional[dict[str, int]] = None,
    device: torch.device | str = "cpu",
) -> list:
    """One conditioning entry on `device` in fp32. `sdxl_size` is given only for SDXL targets."""
    as_out = lambda t: t.to(device=device, dtype=torch.float32)  # noqa: E731
    check_concat_has_clip(concat_clip, clip_context)
    tokens = conditioning_context(as_out(context), llm_strength, as_out(clip_context) * clip_strength if concat_clip else None)

    extras: dict = {}
    if pooled is not None and clip_pooled is not None:
        extras["pooled_output"] = torch.lerp(as_out(pooled), as_out(clip_pooled), float(pooled_blend))
    elif pooled is not None:
        extras["pooled_output"] = as_out(pooled)
    elif clip_pooled is not None:
        extras["pooled_output"] = as_out(clip_pooled)
    if sdxl_size is not None:
        extras.update({name: int(sdxl_size[name]) for name in SDXL_SIZE_FIELDS})
    return [[tokens, extras]]
