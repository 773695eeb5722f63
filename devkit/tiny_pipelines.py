"""Tiny random diffusers pipeline folders (SD1.5-like, SD2 v-prediction-like, SDXL-like) for trainer tests.

They are real `save_pretrained` folders (model_index.json, unet/, vae/, scheduler/, text_encoder[_2]/,
tokenizer[_2]/) of the same classes and structure as the full models, scaled down so that a training
step takes well under a second on a CPU:

* UNet: two resolution levels (32, 64 channels), one cross-attention level, context width 32
  (64 for SDXL = the two text encoders' widths concatenated, as in SDXL), SDXL's `text_time`
  size conditioning with a 32-wide pooled vector;
* VAE: two levels, so latents are images / 2 with 4 channels;
* CLIP text encoders: 2 layers of width 32 with the real CLIP tokenizer ComfyUI ships
  (`comfy/sd1_tokenizer`), so prompts tokenize exactly as with the real model;
* scheduler: SD's scaled-linear DDPM schedule (epsilon, or v_prediction for the SD2-like one).

    tiny_pipeline("sd15" | "sd2v" | "sdxl") -> Path    # built once per machine into cache_dir()

Folders are written to a temporary sibling and renamed, so parallel or aborted runs never see half
a folder. Bump TINY_VERSION when a builder changes.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from devkit.cache import cache_dir, comfy_tokenizer_dir

TINY_VERSION = 1
KINDS = ("sd15", "sd2v", "sdxl", "sd15-bench")  # sd15-bench: a wider, deeper UNet for bench/trainer_overhead.py

# SD's noise schedule (the same numbers as runwayml/stable-diffusion-v1-5/scheduler_config.json)
SD_SCHEDULER = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    clip_sample=False, steps_offset=1,
)


def _unet(kind: str):
    from diffusers import UNet2DConditionModel

    common = dict(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=32,
    )
    if kind == "sd15-bench":  # big enough that the UNet dominates a step, as it does at full size (~25M params)
        return UNet2DConditionModel(
            sample_size=32, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(64, 128, 256),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), norm_num_groups=32,
            cross_attention_dim=32, attention_head_dim=(2, 4, 8),
        )
    if kind == "sdxl":
        return UNet2DConditionModel(
            **common, cross_attention_dim=64, attention_head_dim=(2, 4), use_linear_projection=True,
            transformer_layers_per_block=(1, 2), addition_embed_type="text_time", addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + 32,  # six size numbers x 8 + pooled width 32
        )
    # SD2 uses linear projections in its transformer blocks; SD1.5 uses 1x1 convolutions
    return UNet2DConditionModel(**common, cross_attention_dim=32, attention_head_dim=(2, 4), use_linear_projection=kind == "sd2v")


def _vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=32,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"), up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        sample_size=32,
    )


def _text_encoder(with_projection: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, projection_dim=32, hidden_act="quick_gelu", bos_token_id=49406, eos_token_id=49407,
        pad_token_id=49407,
    )
    return CLIPTextModelWithProjection(config) if with_projection else CLIPTextModel(config)


def _build(kind: str, out: Path) -> None:
    import torch
    from diffusers import DDPMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
    from transformers import CLIPTokenizer

    torch.manual_seed({"sd15": 0, "sd2v": 1, "sdxl": 2, "sd15-bench": 3}[kind])
    tokenizer = CLIPTokenizer.from_pretrained(str(comfy_tokenizer_dir("sd1_tokenizer")), model_max_length=77)
    prediction = "v_prediction" if kind == "sd2v" else "epsilon"
    scheduler = DDPMScheduler(**SD_SCHEDULER, prediction_type=prediction)
    if kind == "sdxl":
        pipe = StableDiffusionXLPipeline(
            vae=_vae(), text_encoder=_text_encoder(False), text_encoder_2=_text_encoder(True), tokenizer=tokenizer,
            tokenizer_2=tokenizer, unet=_unet(kind), scheduler=scheduler,
        )
    else:
        pipe = StableDiffusionPipeline(
            vae=_vae(), text_encoder=_text_encoder(False), tokenizer=tokenizer, unet=_unet(kind), scheduler=scheduler,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
    pipe.save_pretrained(str(out), safe_serialization=True)


def tiny_pipeline(kind: str) -> Path:
    """The folder of a tiny random diffusers pipeline of `kind` (sd15, sd2v, sdxl), built on first use."""
    if kind not in KINDS:
        raise ValueError(f"unknown tiny pipeline {kind!r}; choose one of {KINDS}")
    final = cache_dir() / "tiny_pipelines" / f"{kind}-v{TINY_VERSION}"
    if (final / "model_index.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{kind}-", dir=final.parent))
    try:
        _build(kind, tmp)
        try:
            os.rename(tmp, final)
        except OSError:  # another process finished first: theirs is as good as ours
            if not (final / "model_index.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
