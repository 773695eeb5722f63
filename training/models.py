"""The base model the adapter is trained for: UNet, VAE, noise schedule and the CLIP teacher's text encoders.

`load_base_model` reads a diffusers folder (SD1.5, SD2 incl. v-prediction, SDXL) or, where it can be
done offline, the single-file checkpoint a ComfyUI user already has. `BaseModel` then offers the
three calls the trainer needs, each written once so that training and validation cannot drift:

* `encode_clip(prompts)`   the teacher's own conditioning: CLIP context [B, 77, C] (+ pooled for SDXL)
* `predict_eps(...)`       one UNet call, with SDXL's size conditioning, converted to epsilon space
* `encode_images(...)`     VAE latents (the distribution's mean, times the scaling factor)
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from training.losses import v_to_epsilon

log = logging.getLogger(__name__)

# ComfyUI ships these inference YAMLs; diffusers' from_single_file can read them offline.
COMFY_YAMLS = {"sd15": "v1-inference.yaml", "sd2": "v2-inference-v.yaml"}


class BaseModelError(ValueError):
    """The base model cannot be loaded or used; the message says what to provide."""


@dataclass
class BaseModel:
    family: str  # "sd15" | "sd2" | "sdxl"
    unet: torch.nn.Module
    vae: torch.nn.Module
    scheduler: object  # diffusers DDPMScheduler (training noise schedule)
    text_encoders: list  # CLIPTextModel (+ CLIPTextModelWithProjection for SDXL)
    tokenizers: list
    name: str  # folder or file name, for provenance

    @property
    def prediction_type(self) -> str:
        return self.scheduler.config.prediction_type

    @property
    def context_dim(self) -> int:
        return int(self.unet.config.cross_attention_dim)

    @property
    def pooled_dim(self) -> Optional[int]:
        """Width of SDXL's pooled text vector (the UNet's add-embedding input minus 6 size numbers)."""
        if self.family != "sdxl":
            return None
        cfg = self.unet.config
        return int(cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim)

    @property
    def vae_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def alphas_cumprod(self) -> Tensor:
        return self.scheduler.alphas_cumprod

    def frozen_modules(self) -> list[torch.nn.Module]:
        return [self.unet, self.vae, *self.text_encoders]

    @torch.no_grad()
    def encode_clip(self, prompts: list[str], device) -> tuple[Tensor, Optional[Tensor]]:
        """CLIP conditioning exactly as the diffusers pipelines build it (SDXL: penultimate layers of both encoders)."""
        contexts, pooled = [], None
        for tokenizer, encoder in zip(self.tokenizers, self.text_encoders):
            length = encoder.config.max_position_embeddings  # 77; some tokenizer folders claim more
            ids = tokenizer(prompts, padding="max_length", max_length=length, truncation=True,
                            return_tensors="pt").input_ids.to(device)
            if self.family == "sdxl":
                out = encoder(ids, output_hidden_states=True)
                contexts.append(out.hidden_states[-2])
                if hasattr(out, "text_embeds"):
                    pooled = out.text_embeds
            else:
                contexts.append(encoder(ids).last_hidden_state)
        return torch.cat(contexts, dim=-1), pooled

    def predict_eps(self, x_t: Tensor, timesteps: Tensor, context: Tensor, pooled: Optional[Tensor],
                    sizes: Optional[Tensor]) -> Tensor:
        """One UNet call; v-prediction outputs are converted to epsilon so the loss lives in one space."""
        added = None
        if self.family == "sdxl":
            if pooled is None or sizes is None:
                raise BaseModelError("an SDXL UNet needs a pooled text vector and size conditioning in every call")
            # time_ids [B, 6] = (original h, w, crop top, left, target h, w): each sample's bucket (training/data.py)
            added = {"text_embeds": pooled.to(x_t.dtype), "time_ids": sizes.to(x_t.device, x_t.dtype)}
        out = self.unet(x_t, timesteps, encoder_hidden_states=context.to(x_t.dtype), added_cond_kwargs=added).sample
        if self.prediction_type == "v_prediction":
            return v_to_epsilon(out, x_t, self.alphas_cumprod.to(x_t.device), timesteps)
        if self.prediction_type != "epsilon":
            raise BaseModelError(f"prediction type {self.prediction_type!r} is not supported (epsilon or v_prediction)")
        return out

    @torch.no_grad()
    def encode_images(self, pixels: Tensor) -> Tensor:
        """Pixels in [-1, 1], [B, 3, H, W] -> latents [B, 4, H/f, W/f] (deterministic: the posterior mean)."""
        latents = self.vae.encode(pixels.to(self.vae.dtype)).latent_dist.mean
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return (latents - shift) * self.vae.config.scaling_factor

    @torch.no_grad()
    def decode_latents(self, latents: Tensor) -> Tensor:
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return self.vae.decode(latents.to(self.vae.dtype) / self.vae.config.scaling_factor + shift).sample


def detect_family(unet_config, prediction_type: str) -> str:
    """sdxl: the UNet takes size conditioning; sd2: v-prediction or a 1024-wide context; else sd15."""
    if getattr(unet_config, "addition_embed_type", None) == "text_time":
        return "sdxl"
    if prediction_type == "v_prediction" or unet_config.cross_attention_dim == 1024:
        return "sd2"
    return "sd15"


def load_base_model(path: str, yaml: str = "", family: str = "", device="cpu", dtype=torch.float32) -> BaseModel:
    """Load a diffusers folder or a single-file checkpoint, frozen, in eval mode, on `device`."""
    src = Path(path)
    if not path:
        raise BaseModelError("no base model given: pass --base-model <diffusers folder or .safetensors checkpoint>")
    if src.is_dir():
        pipe = _load_folder(src)
    elif src.is_file():
        pipe = _load_single_file(src, yaml)
    else:
        raise BaseModelError(f"base model {src} does not exist: pass a diffusers folder (with model_index.json) or a .safetensors file")
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    encoders = [e for e in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)) if e is not None]
    tokenizers = [t for t in (pipe.tokenizer, getattr(pipe, "tokenizer_2", None)) if t is not None]
    fam = family or detect_family(pipe.unet.config, scheduler.config.prediction_type)
    model = BaseModel(fam, pipe.unet, pipe.vae, scheduler, encoders, tokenizers, src.name)
    if fam == "sdxl" and len(encoders) != 2:
        raise BaseModelError(f"{src} has an SDXL UNet but {len(encoders)} text encoder(s); SDXL needs text_encoder and text_encoder_2")
    for module in model.frozen_modules():
        module.requires_grad_(False)
        module.eval()
        module.to(device=device)
        if module.dtype != dtype:
            module.to(dtype=dtype)
    log.info("base model %s: %s, %s prediction, context %d, pooled %s", src.name, fam, model.prediction_type,
             model.context_dim, model.pooled_dim)
    return model


def _load_folder(src: Path):
    if not (src / "model_index.json").is_file():
        raise BaseModelError(f"{src} is not a diffusers pipeline folder (no model_index.json); "
                             "convert a checkpoint with diffusers' convert scripts or pass the .safetensors file")
    from diffusers import DiffusionPipeline

    try:
        return DiffusionPipeline.from_pretrained(str(src), local_files_only=True, safety_checker=None,
                                                 requires_safety_checker=False)
    except TypeError:  # SDXL pipelines take no safety checker arguments
        return DiffusionPipeline.from_pretrained(str(src), local_files_only=True)


def _load_single_file(src: Path, yaml: str):
    """A ComfyUI-style single-file checkpoint, offline. diffusers needs the text encoders' Hub configs for
    this, so it works only where they are in the local Hugging Face cache; otherwise say what to do."""
    if src.suffix not in (".safetensors", ".sft"):
        raise BaseModelError(f"{src}: only .safetensors checkpoints are read (never pickled .ckpt files)")
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    original = yaml or _comfy_yaml_for(src)
    errors = []
    for cls in (StableDiffusionPipeline, StableDiffusionXLPipeline):
        try:
            kwargs = {"original_config": original} if original and cls is StableDiffusionPipeline else {}
            return cls.from_single_file(str(src), local_files_only=True, **kwargs)
        except Exception as err:  # noqa: BLE001 - we report every attempt below
            errors.append(f"{cls.__name__}: {type(err).__name__}: {str(err).splitlines()[0][:300]}")
    raise BaseModelError(
        f"could not load the single-file checkpoint {src} offline ({'; '.join(errors)}). diffusers needs the "
        "text encoder/tokenizer configs of the original Hub repository, which are not in the local cache. "
        "Convert it once where the Hub is reachable (diffusers' StableDiffusionPipeline.from_single_file(...)"
        ".save_pretrained(folder)) and pass that folder as --base-model."
    )


def _comfy_yaml_for(src: Path) -> str:
    """ComfyUI's shipped v1 inference YAML when ComfyUI is importable next to us, else ''."""
    try:
        import folder_paths  # type: ignore[import-not-found]  # only inside a ComfyUI install
    except ImportError:
        return ""
    candidate = Path(folder_paths.models_dir) / "configs" / COMFY_YAMLS["sd15"]
    return str(candidate) if candidate.is_file() else ""
