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

# ComfyUI ships these inference YAMLs in models/configs/; diffusers' from_single_file reads them offline.
# SD2 defaults to the 768-v (v-prediction) one; for the 512 epsilon base pass its v2-inference.yaml explicitly.
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
    """Load a diffusers folder or a single-file checkpoint, frozen, in eval mode, on `device`.

    `yaml` (model.base_model_config) is for a single file only: a diffusers folder of the same family
    whose configs describe the checkpoint, or an inference YAML (see _load_single_file)."""
    src = Path(path)
    if not path:
        raise BaseModelError("no base model given: pass --base-model <diffusers folder or .safetensors checkpoint>")
    if src.is_dir():
        if yaml:
            log.warning("model.base_model_config=%s is used only with a single-file --base-model; ignored for the folder %s", yaml, src)
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


def checkpoint_family(src: Path) -> str:
    """sd15 | sd2 | sdxl from a single-file checkpoint's key names (its header only; no weights are read)."""
    from safetensors import safe_open

    try:
        with safe_open(str(src), framework="pt") as handle:
            keys = list(handle.keys())
    except Exception as err:  # noqa: BLE001 - a truncated or foreign file: say so
        raise BaseModelError(f"{src} is not a readable safetensors file ({err}); copy the checkpoint again") from None
    if not any(k.startswith("model.diffusion_model.") for k in keys):
        raise BaseModelError(f"{src} is not a single-file Stable Diffusion checkpoint (no model.diffusion_model.* keys); "
                             "pass the checkpoint ComfyUI's CheckpointLoaderSimple loads, or a diffusers folder")
    if any(k.startswith("conditioner.embedders.") for k in keys):
        return "sdxl"
    if any(k.startswith("cond_stage_model.model.") for k in keys):  # OpenCLIP ViT-H text encoder
        return "sd2"
    if any(k.startswith("cond_stage_model.transformer.") for k in keys):  # OpenAI CLIP ViT-L
        return "sd15"
    raise BaseModelError(f"{src} holds a UNet but no text encoder (cond_stage_model.* / conditioner.*), which the "
                         "teacher needs: pass the full checkpoint, or a diffusers folder")


def _load_single_file(src: Path, config: str):
    """A ComfyUI-style single-file checkpoint, offline, through diffusers' from_single_file.

    The checkpoint holds weights only; diffusers needs each component's config besides. Offline that is
    (a) `config` = a local diffusers folder of the same family (its model_index.json, component configs
    and tokenizers are used, the weights come from the checkpoint), or (b) an inference YAML (`config`, or
    ComfyUI's shipped v1/v2 YAML when we run inside a ComfyUI install) for the UNet and VAE, where diffusers
    still takes the CLIP text encoder and tokenizer configs from the local Hugging Face cache. When neither
    works, the error says exactly what to pass."""
    if src.suffix not in (".safetensors", ".sft"):
        raise BaseModelError(f"{src}: only .safetensors checkpoints are read (never pickled .ckpt files)")
    family = checkpoint_family(src)
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    pipeline = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    fix = (f"pass --base-model-config <a diffusers folder of the same family ({family}): model_index.json, "
           "unet/, vae/, text_encoder/, tokenizer/, scheduler/ configs; its weights are not needed> (or --set "
           "model.base_model_config=...), or convert the checkpoint once where the Hub is reachable "
           "(StableDiffusionPipeline.from_single_file(...).save_pretrained(folder)) and pass that folder as --base-model")
    if config and Path(config).is_dir():
        kwargs, how = {"config": str(config)}, f"with the diffusers config folder {config}"
    else:
        yaml = config or _comfy_yaml_for(family)
        if not yaml:
            raise BaseModelError(f"cannot load the single-file {family} checkpoint {src} offline: diffusers needs the "
                                 f"configs of its components, and none were given or found (ComfyUI's models/configs/"
                                 f"{COMFY_YAMLS.get(family, '<no YAML for SDXL>')} is used only inside a ComfyUI install). To fix: {fix}")
        if not Path(yaml).is_file():
            raise BaseModelError(f"model.base_model_config {yaml} does not exist; {fix}")
        kwargs, how = {"original_config": str(yaml)}, f"with the inference YAML {yaml}"
    try:
        return pipeline.from_single_file(str(src), local_files_only=True, **kwargs)
    except Exception as err:  # noqa: BLE001 - diffusers raises many types here; all mean the same to the user
        first = (str(err).strip().splitlines() or [""])[0][:300]
        raise BaseModelError(
            f"could not load the single-file {family} checkpoint {src} offline {how} ({type(err).__name__}: {first}). "
            + ("Is the config folder of the same family and size as the checkpoint? " if "config" in kwargs else
               "An inference YAML describes the UNet and VAE only; the CLIP text encoder and tokenizer configs must "
               "then be in the local Hugging Face cache. ")
            + f"To fix: {fix}") from None


def _comfy_yaml_for(family: str) -> str:
    """ComfyUI's shipped inference YAML for `family` when the trainer runs inside a ComfyUI install, else ''."""
    name = COMFY_YAMLS.get(family)
    if name is None:  # ComfyUI ships no SDXL YAML
        return ""
    folders = []
    try:
        import folder_paths  # type: ignore[import-not-found]  # only importable inside a ComfyUI process

        folders.append(Path(folder_paths.models_dir) / "configs")
    except ImportError:
        pass
    # this repository cloned as ComfyUI/custom_nodes/<pack>/: ComfyUI's root is two levels above it
    folders.append(Path(__file__).resolve().parents[3] / "models" / "configs")
    return next((str(f / name) for f in folders if (f / name).is_file()), "")
