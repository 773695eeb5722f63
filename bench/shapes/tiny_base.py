"""The shapes benchmark's tiny base model, the weak teacher: a diffusers Stable Diffusion folder made from scratch.

The trainer treats it like any SD1.5 checkpoint (docs/design.md section 6): `StableDiffusionPipeline.from_pretrained`
reads its `model_index.json` and the five parts, all of the same classes as the real model, scaled down:

- `vae`: AutoencoderKL with three levels, so 64x64 images become 16x16x8 latents (4x down, 8 channels). Trained
  first, on 32x32 crops (it is fully convolutional: no attention in its mid block; crops gave better
  round trips per CPU second than whole images, measured), with object pixels weighted up and a tiny
  KL weight as in SD; its `scaling_factor` is set to 1 / std of the training latents (posterior means,
  what the adapter trainer encodes), as SD's 0.18215 was.
  Its round trip is checked with the benchmark's own scorer (`vae_roundtrip_scores`): a bilinear 4x
  down/up destroys 10 px shapes, a trained VAE must not.
- `text_encoder`: CLIPTextModel with ZERO transformer layers and zeroed, frozen position embeddings.
  Every output token is `final_layer_norm(token_embedding[id])`, a function of its own id only, so the
  context is a bag of words: "a red circle left of a blue square" and "a blue circle left of a red square"
  give the same multiset of vectors. Cross-attention can then find "red", "blue", "circle" and "square",
  but never which colour belongs to which shape: like CLIP, it cannot bind attributes. That is the weak
  teacher the adapter has to beat.
- `tokenizer`: a CLIPTokenizer (byte-level BPE with `</w>` word ends, `<|startoftext|>`/`<|endoftext|>`,
  77 tokens) whose merges are learnt here from the captions, so `make shapes-assets` needs no download.
- `unet`: UNet2DConditionModel over 16x16 latents, cross-attention at 16x16 and 8x8, context width 64.
- `scheduler`: SD's DDPMScheduler (scaled_linear betas, 1000 steps, epsilon prediction).

UNet and text encoder are trained together from scratch on train-split scenes with 10% caption dropout
(the empty prompt, for classifier-free guidance) and min-SNR-5 weighting (Hang et al. 2023, from
training/losses.py) with an EMA of the weights, which matters a lot for a run this short.
`teacher_scores` samples held-out prompts with DDIM and guidance and scores them.

    folder, stats = build_tiny_base("assets/shapes-bow/tiny-base", BaseConfig(), seed=0)
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from .fitting import loss_summary, optimizer_step
from .scenes import BACKGROUND, IMAGE_SIZE, Sample, generate
from .scorer import score, summarize
from .splits import holdout_named

__all__ = ["BaseConfig", "SD_SCHEDULER", "build_clip_tokenizer", "build_tiny_base", "make_text_encoder",
           "load_frozen_text_side", "load_vae", "teacher_scores", "vae_roundtrip_scores"]

logger = logging.getLogger(__name__)

# SD's noise schedule (runwayml/stable-diffusion-v1-5/scheduler_config.json), epsilon prediction.
SD_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                    clip_sample=False, steps_offset=1, prediction_type="epsilon")
CONTEXT_TOKENS = 77  # CLIP's sequence length: the adapter's default N matches it (docs/design.md section 2)
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


@dataclass(frozen=True)
class BaseConfig:
    """Sizes and training budget. The defaults are the shipped teacher; `quick()` is for tests (seconds)."""

    train_images: int = 8000
    vae_channels: tuple[int, ...] = (16, 32, 32)  # three levels: 4x down, 16x16 latents
    # 8, not SD's 4: a 10 px shape is 2.5 latent pixels wide at 4x down, and with 4 channels the round trip
    # lost the shape of small objects (56% overall on val scenes, assets v1); a 2x VAE instead would make
    # every UNet step ~5x dearer (32x32 latents, measured), which this CPU budget cannot pay.
    vae_latent_channels: int = 8
    vae_steps: int = 2500
    vae_batch: int = 16
    vae_crop: int = 32
    vae_lr: float = 2e-3
    vae_kl_weight: float = 1e-6
    vae_object_weight: float = 20.0  # extra loss weight on pixels that are not background
    unet_channels: tuple[int, ...] = (32, 64, 64)
    text_width: int = 64
    unet_steps: int = 2500  # 1200 gave a teacher that drew the right colour 36% of the time (assets v1)
    unet_batch: int = 32
    unet_lr: float = 1e-3
    ema_decay: float = 0.995
    caption_dropout: float = 0.1
    eval_vae_images: int = 300
    eval_prompts: int = 200
    eval_steps: int = 25  # DDIM steps
    guidance_scale: float = 4.0
    holdout: str = "pairings"  # which scenes are held out of training (bench/shapes/splits.py)

    @classmethod
    def quick(cls) -> "BaseConfig":
        return cls(train_images=64, vae_channels=(8, 16, 16), vae_steps=3, vae_batch=8, unet_channels=(16, 32, 32),
                   text_width=32, unet_steps=3, unet_batch=8, eval_vae_images=8, eval_prompts=4, eval_steps=2)


# --- tokenizer and text encoder ---

def build_clip_tokenizer(captions: list[str]):
    """A CLIPTokenizer whose BPE merges are learnt from the captions; every byte stays encodable.

    The vocabulary is laid out like CLIP's: the 256 byte symbols, the same with `</w>`, one token per
    learnt merge, then the two special tokens. The merges are trained with CLIP's own normalizer and
    pre-tokenizer (taken from an empty CLIPTokenizer), so training and use split text identically.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import CLIPTokenizer

    template = CLIPTokenizer(vocab={BOS: 0, EOS: 1}, merges=[], model_max_length=CONTEXT_TOKENS)
    learner = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    learner.normalizer = template.backend_tokenizer.normalizer
    learner.pre_tokenizer = template.backend_tokenizer.pre_tokenizer
    learner.train_from_iterator(captions, trainers.BpeTrainer(
        vocab_size=1000, min_frequency=2, end_of_word_suffix="</w>", show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m)
              for m in json.loads(learner.to_str())["model"]["merges"]]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    symbols = alphabet + [s + "</w>" for s in alphabet] + [a + b for a, b in merges]
    vocab = {s: i for i, s in enumerate(dict.fromkeys(symbols))}
    vocab.update({BOS: len(vocab), EOS: len(vocab) + 1})
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=CONTEXT_TOKENS)


def save_vocab_and_merges(tokenizer, folder: Path) -> None:
    """Also write CLIP's classic vocab.json + merges.txt beside tokenizer.json (transformers 5 writes only the latter).

    Loaders that predate tokenizer.json, or read CLIP vocabularies themselves (ComfyUI's SD1 tokenizer
    code takes vocab.json and merges.txt), then read the same vocabulary.
    """
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (folder / "vocab.json").write_text(json.dumps(tokenizer.get_vocab(), ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")


def make_text_encoder(tokenizer, width: int):
    """CLIPTextModel with no transformer layers and zeroed, frozen position embeddings: a bag of words."""
    from transformers import CLIPTextConfig, CLIPTextModel

    encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=width, intermediate_size=width, num_hidden_layers=0,
        num_attention_heads=4, max_position_embeddings=CONTEXT_TOKENS, projection_dim=width,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))
    text_model = getattr(encoder, "text_model", encoder)  # transformers < 5 nests the modules one level deeper
    position = text_model.embeddings.position_embedding.weight
    with torch.no_grad():
        position.zero_()
    position.requires_grad_(False)  # stays zero through training: word order must not reach the UNet
    return encoder


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    """Token ids [B, 77] exactly as StableDiffusionPipeline makes them (padded with EOS, truncated)."""
    return tokenizer(captions, padding="max_length", max_length=CONTEXT_TOKENS, truncation=True,
                     return_tensors="pt").input_ids


# --- VAE ---

def _images_tensor(samples: list[Sample]) -> torch.Tensor:
    """uint8 HxWx3 images -> float [N, 3, H, W] in [-1, 1] (diffusers' convention)."""
    images = np.stack([s.image for s in samples])
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


def _to_uint8(images: torch.Tensor) -> np.ndarray:
    """float [N, 3, H, W] in [-1, 1] -> uint8 [N, H, W, 3]."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def make_vae(channels: tuple[int, ...], latent_channels: int = 4):
    from diffusers import AutoencoderKL

    n = len(channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels, block_out_channels=channels, layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        norm_num_groups=min(8, channels[0]), sample_size=IMAGE_SIZE, mid_block_add_attention=False,
    )


def train_vae(vae, images: torch.Tensor, config: BaseConfig, generator: torch.Generator) -> dict:
    """Reconstruction (MSE + L1) plus a tiny KL, on random crops whose offsets keep the latent grid aligned."""
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.vae_lr, weight_decay=0.0)
    factor = 2 ** (len(config.vae_channels) - 1)
    crop = min(config.vae_crop, IMAGE_SIZE)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, config.vae_steps)
    background = torch.tensor(BACKGROUND, dtype=torch.float32).view(1, 3, 1, 1) / 127.5 - 1
    vae.train()
    losses = []
    for step in range(config.vae_steps):
        picks = torch.randint(len(images), (config.vae_batch,), generator=generator)
        y, x = (torch.randint((IMAGE_SIZE - crop) // factor + 1, (2,), generator=generator) * factor).tolist()
        batch = images[picks, :, y:y + crop, x:x + crop]
        posterior = vae.encode(batch).latent_dist
        latents = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        recon = vae.decode(latents).sample
        # Objects cover a few percent of the pixels: unweighted, the VAE first learns "everything is grey"
        # (measured: 6% round-trip accuracy after 600 steps). Weighting object pixels up fixes that.
        weight = 1 + config.vae_object_weight * (batch - background).abs().amax(1, keepdim=True).gt(0.05)
        error = (weight * ((recon - batch).pow(2) + (recon - batch).abs())).mean() / weight.mean()
        loss = error + config.vae_kl_weight * posterior.kl().mean()
        losses.append(optimizer_step(loss, optimizer, schedule))
        if step % 50 == 0 or step == config.vae_steps - 1:
            logger.info("tiny VAE step %d/%d loss %.4f", step + 1, config.vae_steps, losses[-1])
    vae.eval()
    return loss_summary(losses, "final_loss")


@torch.no_grad()
def encode_latents(vae, images: torch.Tensor, batch_size: int = 128) -> torch.Tensor:
    """The VAE posterior's mean for every image (unscaled): what the adapter trainer encodes too
    (training/models.py), so teacher and adapter are trained on the same latents."""
    return torch.cat([vae.encode(images[i:i + batch_size]).latent_dist.mean for i in range(0, len(images), batch_size)])


@torch.no_grad()
def vae_roundtrip_scores(vae, samples: list[Sample], batch_size: int = 64) -> dict[str, float]:
    """The scorer's summary on decode(encode(image)) against each image's own caption (posterior mean)."""
    scores = []
    for i in range(0, len(samples), batch_size):
        chunk = samples[i:i + batch_size]
        recon = vae.decode(vae.encode(_images_tensor(chunk)).latent_dist.mean).sample
        scores += [score(image, s.spec) for image, s in zip(_to_uint8(recon), chunk)]
    return summarize(scores)


# --- UNet + text encoder ---

def make_unet(channels: tuple[int, ...], context_dim: int, latent_size: int, latent_channels: int = 4):
    from diffusers import UNet2DConditionModel

    n = len(channels)
    # cross-attention on every level but the coarsest: where things are needs resolution, 4x4 adds little
    down = ("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",)
    up = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1)
    return UNet2DConditionModel(
        sample_size=latent_size, in_channels=latent_channels, out_channels=latent_channels, layers_per_block=1, block_out_channels=channels,
        down_block_types=down, up_block_types=up, cross_attention_dim=context_dim,
        attention_head_dim=tuple(max(1, c // 16) for c in channels),  # diffusers' legacy name: the HEAD COUNT (16 wide)
        norm_num_groups=min(16, channels[0]),
    )


class _EMA:
    """Exponential moving average of parameters, with the usual warm-up (decay grows as (1+n)/(10+n))."""

    def __init__(self, params: list[torch.nn.Parameter], decay: float):
        self.params, self.decay, self.steps = params, decay, 0
        self.shadow = [p.detach().clone() for p in params]

    @torch.no_grad()
    def update(self) -> None:
        self.steps += 1
        decay = min(self.decay, (1 + self.steps) / (10 + self.steps))
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1 - decay)

    @torch.no_grad()
    def copy_to_params(self) -> None:
        for p, s in zip(self.params, self.shadow):
            p.copy_(s)


def train_unet(unet, text_encoder, tokenizer, scheduler, latents: torch.Tensor,
               scaling_factor: float, captions: list[str], config: BaseConfig, generator: torch.Generator) -> dict:
    """Epsilon prediction with min-SNR-5 weighting and caption dropout; UNet and text encoder trained jointly."""
    from training.losses import min_snr_weight  # the trainer's own weighting, not a copy

    ids, empty = tokenize(tokenizer, captions), tokenize(tokenizer, [""])
    weights = min_snr_weight(scheduler.alphas_cumprod.double()).float()
    weights = weights / weights.mean()
    params = [p for m in (unet, text_encoder) for p in m.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.unet_lr, weight_decay=0.01)
    warmup = max(1, config.unet_steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
    ema = _EMA(params, config.ema_decay)
    unet.train()
    text_encoder.train(any(p.requires_grad for p in text_encoder.parameters()))  # a frozen encoder stays in eval
    losses = []
    for step in range(config.unet_steps):
        picks = torch.randint(len(latents), (config.unet_batch,), generator=generator)
        x0 = latents[picks] * scaling_factor
        drop = torch.rand(config.unet_batch, generator=generator) < config.caption_dropout
        batch_ids = torch.where(drop[:, None], empty, ids[picks])
        t = torch.randint(scheduler.config.num_train_timesteps, (config.unet_batch,), generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        x_t = scheduler.add_noise(x0, noise, t)
        pred = unet(x_t, t, text_encoder(batch_ids)[0]).sample
        loss = (weights[t] * (pred - noise).pow(2).mean(dim=(1, 2, 3))).mean()
        losses.append(optimizer_step(loss, optimizer, schedule, clip_params=params))
        ema.update()
        if step % 100 == 0 or step == config.unet_steps - 1:
            logger.info("tiny UNet step %d/%d loss %.4f", step + 1, config.unet_steps, losses[-1])
    ema.copy_to_params()
    unet.eval(), text_encoder.eval()
    return loss_summary(losses, "final_loss")


# --- the whole teacher ---

def teacher_scores(folder: str | Path, prompts: list[str], config: BaseConfig, seed: int = 0,
                   batch_size: int = 50) -> tuple[dict[str, float], np.ndarray]:
    """Sample `prompts` from the saved pipeline (DDIM, CFG) and score them; returns (summary, uint8 images)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(seed)
    images = []
    for i in range(0, len(prompts), batch_size):
        out = pipe(prompts[i:i + batch_size], height=IMAGE_SIZE, width=IMAGE_SIZE, generator=generator,
                   num_inference_steps=config.eval_steps, guidance_scale=config.guidance_scale, output_type="np")
        images.append((out.images * 255).round().clip(0, 255).astype(np.uint8))
    images = np.concatenate(images)
    return summarize([score(image, prompt) for image, prompt in zip(images, prompts)]), images


def load_frozen_text_side(folder: str | Path):
    """(tokenizer, text encoder) from a folder holding `tokenizer/` and `text_encoder/` (a toy CLIP, or a base),
    the encoder frozen: the base UNet then learns to read a fixed encoder's contexts, as SD's did from CLIP."""
    from transformers import CLIPTextModel, CLIPTokenizer

    folder = Path(folder)
    missing = [part for part in ("tokenizer", "text_encoder") if not (folder / part).is_dir()]
    if missing:
        raise FileNotFoundError(f"{folder} has no {' or '.join(missing)} folder: give a toy CLIP folder made by "
                                f"`python -m bench.shapes.toy_clip --out FOLDER`")
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer", local_files_only=True)
    encoder = CLIPTextModel.from_pretrained(folder / "text_encoder", local_files_only=True).requires_grad_(False)
    return tokenizer, encoder.eval()


def load_vae(base_folder: str | Path):
    """A built base's VAE (its `vae/` folder), reused so that bases differing only in their text side share it."""
    from diffusers import AutoencoderKL

    folder = Path(base_folder) / "vae"
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{base_folder} has no vae/config.json: give a tiny base folder, such as "
                                f"assets/shapes-bow/tiny-base")
    return AutoencoderKL.from_pretrained(folder, local_files_only=True).eval()


def build_tiny_base(dest: str | Path, config: BaseConfig = BaseConfig(), seed: int = 0,
                    text_side_from: str | Path | None = None,
                    vae_from: str | Path | None = None) -> tuple[Path, dict]:
    """Train VAE, then UNet + bag-of-words text encoder on train scenes; save the diffusers folder at `dest`.

    `text_side_from`: a toy CLIP folder whose tokenizer and (frozen) text encoder replace the bag of words.
    `vae_from`: a base folder whose trained VAE is reused instead of training one (its scaling factor kept).
    """
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    dest = Path(dest)
    stats: dict = {"config": asdict(config),
                   "text_side": "bag-of-words" if text_side_from is None else f"frozen: {Path(text_side_from).name}"}
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # module initialisation
    heldout = holdout_named(config.holdout)
    samples = generate("train", config.train_images, seed, heldout)
    images = _images_tensor(samples)

    start = time.perf_counter()
    if vae_from is None:
        vae = make_vae(config.vae_channels, config.vae_latent_channels)
        stats["vae"] = train_vae(vae, images, config, generator)
        latents = encode_latents(vae, images)
        vae.register_to_config(scaling_factor=float(1 / latents.std()))  # unit-variance latents, as SD's 0.18215
    else:
        vae = load_vae(vae_from)
        stats["vae"] = {"reused_from": Path(vae_from).name}
        latents = encode_latents(vae, images)
    stats["vae"].update(
        train_seconds=round(time.perf_counter() - start, 1), scaling_factor=vae.config.scaling_factor,
        parameters=sum(p.numel() for p in vae.parameters()),
        roundtrip_val=vae_roundtrip_scores(vae, generate("val", config.eval_vae_images, seed, heldout)),
        roundtrip_heldout=vae_roundtrip_scores(vae, generate("heldout", config.eval_vae_images, seed, heldout)),
    )
    logger.info("tiny VAE: %.0f s, round-trip overall accuracy (val) %.3f", stats["vae"]["train_seconds"],
                stats["vae"]["roundtrip_val"]["overall"])

    start = time.perf_counter()
    if text_side_from is None:
        tokenizer = build_clip_tokenizer([s.caption for s in samples])
        text_encoder = make_text_encoder(tokenizer, config.text_width)
    else:
        tokenizer, text_encoder = load_frozen_text_side(text_side_from)
    latent_size = IMAGE_SIZE // 2 ** (len(config.vae_channels) - 1)
    unet = make_unet(config.unet_channels, text_encoder.config.hidden_size, latent_size,
                     vae.config.latent_channels)
    scheduler = DDPMScheduler(**SD_SCHEDULER)
    stats["unet"] = train_unet(unet, text_encoder, tokenizer, scheduler, latents, vae.config.scaling_factor,
                               [s.caption for s in samples], config, generator)
    stats["unet"].update(train_seconds=round(time.perf_counter() - start, 1),
                         parameters=sum(p.numel() for p in unet.parameters()),
                         text_encoder_parameters=sum(p.numel() for p in text_encoder.parameters()),
                         vocab_size=len(tokenizer))

    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(dest, safe_serialization=True)
    save_vocab_and_merges(tokenizer, dest / "tokenizer")
    logger.info("tiny base: UNet %.0f s -> %s", stats["unet"]["train_seconds"], dest)
    return dest, stats
