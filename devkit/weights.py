"""Random-initialised, full-size Stable Diffusion weights in files ComfyUI's own loaders read.

Real checkpoints cannot be downloaded in this environment, so the end-to-end tests build models with
the exact shapes of SD1.5, SD2 (768-v) and SDXL from diffusers configs, with seeded random weights.
They exercise the same code paths as real files (key detection, dtype handling, memory), while the
images they produce are noise-like: tests compare images, never judge them.

Public API (stable; the e2e fixtures and the node tests rely on it):

    build_sd15() -> SD15Weights(unet, vae, clip_l, controlnet)   # ~2.8 GB on disk, ~1 min once
    build_sd2()  -> SD2Weights(unet, vae)                        # ~1.9 GB, ~30 s once
    build_sdxl() -> SDXLWeights(unet, vae)                       # ~5.3 GB, ~1.5 min once, ~11 GB RAM while building
    build_clip_g() -> CLIPGWeights(clip_g)                       # ~1.4 GB, ~1 min once: SDXL's second text encoder

Each returns paths inside cache_dir()/"weights"/<name>-v<N>/; the first call builds the folder in a
subprocess (`python -m devkit.weights sd15|sd2|sdxl`, the repository root on PYTHONPATH) so the tens of GB of
construction memory are returned to the OS when it exits; later calls only check the folder. Folders
are written to a temporary sibling and renamed, and builds take a file lock, so parallel or aborted
runs never see half a folder. Bump WEIGHTS_VERSION when a builder changes.

CLIP-G is its own set (not part of sdxl) because the SD1.5 server is the one that serves it: pairing it
with CLIP-L in DualCLIPLoader(type="sdxl") gives an SDXL CLIP without starting the 16 GB SDXL server.

All files are fp16 safetensors in diffusers layout (UNETLoader, VAELoader and ControlNetLoader convert
it), except the text encoders, which use the `text_model.`-prefixed transformers layout CLIPLoader and
DualCLIPLoader expect.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from devkit.cache import cache_dir
from devkit.processes import run_in_own_group

log = logging.getLogger(__name__)

WEIGHTS_VERSION = 1
SEED = 1234


@dataclass(frozen=True)
class SD15Weights:
    unet: Path
    vae: Path
    clip_l: Path
    controlnet: Path


@dataclass(frozen=True)
class SD2Weights:
    unet: Path
    vae: Path


@dataclass(frozen=True)
class SDXLWeights:
    unet: Path
    vae: Path


@dataclass(frozen=True)
class CLIPGWeights:
    clip_g: Path


# --- diffusers constructor configs (the published model configs, trimmed to non-default values) ---

SD_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
    down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[128, 256, 512, 512],
)
SD15_UNET = dict(sample_size=64, cross_attention_dim=768)  # the rest are diffusers' defaults = SD1.5
SD2_UNET = dict(sample_size=96, cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20], use_linear_projection=True)
SDXL_UNET = dict(
    sample_size=128,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    block_out_channels=[320, 640, 1280], layers_per_block=2, transformer_layers_per_block=[1, 2, 10],
    attention_head_dim=[5, 10, 20], cross_attention_dim=2048, use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
)
SD15_CONTROLNET = dict(cross_attention_dim=768)  # diffusers' defaults are the SD1.5 ControlNet
CLIP_L = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, projection_dim=768, num_hidden_layers=12,
    num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
)
# OpenCLIP ViT-bigG's text tower, as ComfyUI's comfy/clip_config_bigg.json describes it (SDXL's CLIP-G).
CLIP_G = dict(
    vocab_size=49408, hidden_size=1280, intermediate_size=5120, projection_dim=1280, num_hidden_layers=32,
    num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu",
)

# The key ComfyUI inspects to tell an SD2 768-v (v-prediction) UNet from a 512 eps one: it returns
# V_PREDICTION when the std of this bias exceeds 0.09 (comfy/supported_models.py, SD20.model_type).
# Real 768-v checkpoints pass that test; a random init (zeros) would not, so we set it like a real one.
SD2_VPRED_MARKER = "up_blocks.3.attentions.2.transformer_blocks.0.norm1.bias"


# --- builders (run inside the `python -m devkit.weights` subprocess) ---

def _save_fp16(module_or_sd, path: Path) -> None:
    """Save as contiguous fp16 safetensors (half the disk; ComfyUI upcasts on the CPU anyway)."""
    from safetensors.torch import save_file

    sd = module_or_sd if isinstance(module_or_sd, dict) else module_or_sd.state_dict()
    save_file({k: (v.half() if v.is_floating_point() else v).detach().contiguous() for k, v in sd.items()}, str(path))


def _unet(config: dict):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**config)


def _vae(out: Path, name: str) -> None:
    from diffusers import AutoencoderKL

    _save_fp16(AutoencoderKL(**SD_VAE), out / name)


def _clip_text_state_dict(config: dict) -> dict:
    """A CLIP text encoder (CLIP_L or CLIP_G) in the layout CLIPLoader reads: every key under
    `text_model.`, plus the projection. transformers 5 dropped the prefix from CLIPTextModel.state_dict();
    without it ComfyUI leaves every weight uninitialised and the conditioning is silently NaN. ComfyUI
    tells CLIP-G from CLIP-L by `text_model.encoder.layers.30.mlp.fc1.weight` (comfy/sd.py detect_te_model)."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    model = CLIPTextModelWithProjection(CLIPTextConfig(**config))
    sd = {}
    for key, value in model.state_dict().items():
        if key.startswith("text_projection."):
            sd[key] = value
        else:
            sd[key if key.startswith("text_model.") else "text_model." + key] = value
    if "text_projection.weight" not in sd:
        sd["text_projection.weight"] = torch.randn(config["projection_dim"], config["hidden_size"]) * 0.02
    return sd


def _controlnet(out: Path) -> None:
    """An SD1.5-shape ControlNet. Its zero-initialised output convolutions are randomised so that
    applying it visibly changes the image (a zero ControlNet would make any ControlNet test a no-op)."""
    import torch
    from diffusers import ControlNetModel

    model = ControlNetModel(**SD15_CONTROLNET)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.startswith(("controlnet_down_blocks.", "controlnet_mid_block.", "controlnet_cond_embedding.conv_out.")):
                param.normal_(0.0, 0.02)
    _save_fp16(model, out / "controlnet.safetensors")


def _build_sd15(out: Path) -> dict:
    _save_fp16(_unet(SD15_UNET), out / "unet.safetensors")
    _vae(out, "vae.safetensors")
    _save_fp16(_clip_text_state_dict(CLIP_L), out / "clip_l.safetensors")
    _controlnet(out)
    return {"unet": SD15_UNET, "vae": SD_VAE, "clip_l": CLIP_L, "controlnet": SD15_CONTROLNET}


def _build_sd2(out: Path) -> dict:
    import torch

    unet = _unet(SD2_UNET)
    with torch.no_grad():
        dict(unet.named_parameters())[SD2_VPRED_MARKER].normal_(0.0, 0.2)
    _save_fp16(unet, out / "unet.safetensors")
    _vae(out, "vae.safetensors")
    return {"unet": SD2_UNET, "vae": SD_VAE, "v_prediction_marker": SD2_VPRED_MARKER}


def _build_sdxl(out: Path) -> dict:
    import torch

    # Constructing in fp16 halves the peak (2.57B params: ~5 GB instead of ~10 GB) on a shared machine;
    # the saved file would be fp16 either way.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float16)
    try:
        unet = _unet(SDXL_UNET)
    finally:
        torch.set_default_dtype(previous)
    _save_fp16(unet, out / "unet.safetensors")
    del unet
    _vae(out, "vae.safetensors")  # SDXL's VAE has SD's shape; only its scaling factor (a constant in ComfyUI) differs
    return {"unet": SDXL_UNET, "vae": SD_VAE}


def _build_clip_g(out: Path) -> dict:
    import torch

    # 695M parameters: constructing in fp16 (the saved dtype anyway) keeps the peak near 1.5 GB, not 3 GB.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float16)
    try:
        _save_fp16(_clip_text_state_dict(CLIP_G), out / "clip_g.safetensors")
    finally:
        torch.set_default_dtype(previous)
    return {"clip_g": CLIP_G}


BUILDERS = {"sd15": (_build_sd15, SD15Weights), "sd2": (_build_sd2, SD2Weights), "sdxl": (_build_sdxl, SDXLWeights),
            "clip_g": (_build_clip_g, CLIPGWeights)}
FILES = {"sd15": ("unet", "vae", "clip_l", "controlnet"), "sd2": ("unet", "vae"), "sdxl": ("unet", "vae"),
         "clip_g": ("clip_g",)}


def weights_dir(name: str) -> Path:
    return cache_dir() / "weights" / f"{name}-v{WEIGHTS_VERSION}"


def _result(name: str):
    folder = weights_dir(name)
    cls = BUILDERS[name][1]
    return cls(**{f: folder / f"{f}.safetensors" for f in FILES[name]})


def _is_complete(folder: Path) -> bool:
    return (folder / "build.json").is_file()  # written last, inside the temp folder, before the rename


def build_in_this_process(name: str) -> Path:
    """Build one weight set into its cache folder (atomic). Used by the subprocess; prefer build()."""
    import torch

    builder = BUILDERS[name][0]
    final = weights_dir(name)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        torch.manual_seed(SEED)
        start = time.monotonic()
        configs = builder(tmp)
        info = {"name": name, "version": WEIGHTS_VERSION, "seed": SEED, "configs": configs,
                "build_seconds": round(time.monotonic() - start, 1), "torch": torch.__version__,
                "peak_rss_mb": _peak_rss_mb()}
        (tmp / "build.json").write_text(json.dumps(info, indent=2))
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _peak_rss_mb() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024  # Linux reports KiB


def build(name: str):
    """Return the cached weight set `name` ('sd15', 'sd2', 'sdxl', 'clip_g'), building it first if needed."""
    if name not in BUILDERS:
        raise ValueError(f"unknown weight set {name!r}; choose one of {sorted(BUILDERS)}")
    folder = weights_dir(name)
    if not _is_complete(folder):
        folder.parent.mkdir(parents=True, exist_ok=True)
        with open(folder.parent / f".{folder.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # a parallel run building the same set: wait for it
            if not _is_complete(folder):
                _build_subprocess(name)
    return _result(name)


def _build_subprocess(name: str) -> None:
    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")])))
    log.info("building random %s weights into %s (one-off, cached)", name, weights_dir(name))
    start = time.monotonic()
    proc = run_in_own_group([sys.executable, "-m", "devkit.weights", name], env, timeout=None)  # dies with this process
    if proc.returncode != 0:
        raise RuntimeError(f"building the random {name} weights failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    log.info("built %s weights in %.0f s", name, time.monotonic() - start)


def build_sd15() -> SD15Weights:
    return build("sd15")


def build_sd2() -> SD2Weights:
    return build("sd2")


def build_sdxl() -> SDXLWeights:
    return build("sdxl")


def build_clip_g() -> CLIPGWeights:
    return build("clip_g")


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] not in BUILDERS:
        sys.exit(f"usage: python -m devkit.weights {{{'|'.join(BUILDERS)}}}   (from the repository root)")
    path = build_in_this_process(sys.argv[1])
    print(json.dumps(json.loads((path / "build.json").read_text()), indent=2))
