"""A toy CLIP for the shapes world: a contextual text encoder trained contrastively, with its weakness as a knob.

    python -m bench.shapes.toy_clip [--out outputs/toy-clip] [--steps 600] [--batch 64] [--hard-negatives 0.0]
                                    [--layers 2] [--width 64] [--heads 4] [--lr 1e-3] [--train-images 4000]

The text tower is a real `CLIPTextModel` built from a config, set up as SD1.x's: causal self-attention,
learned position embeddings, 77 tokens padded with EOS and no attention mask, so padding slots see (and
summarise) the whole prompt; the pooled output is the first EOS's state. Its tokenizer is the base's kind
(`tiny_base.build_clip_tokenizer`, BPE learnt from the train captions). The image tower is a small CNN
whose last layer keeps the spatial layout (a flatten, not a global pool), so relations are visible to it.

Training is CLIP's: InfoNCE over the batch in both directions with a learnable temperature (logit scale
initialised at 1/0.07, clamped at 100). The knob is `--hard-negatives`, the share of a batch's two-object
captions that also bring a hard negative: the same caption with its colours swapped, or its relation turned
to the converse ("a red circle left of a blue square" -> "a blue circle left of a red square", "... right
of ..."), made and checked with the caption grammar (`hard_negative`). Hard negatives are extra text
candidates for the image-to-text direction only (as NegCLIP). With none, a batch rarely holds two captions
that differ only in binding, so nothing forces the encoder to bind, as with CLIP.

Written to --out: `text_encoder/` and `tokenizer/` (a diffusers-style pair the base trainer and
`bench.shapes.probe --toy-clip` read), `towers.safetensors` (image tower, projection, logit scale) and
`stats.json`: retrieval accuracy on held-out scenes and the binding discrimination (how often a held-out
image scores its own caption above its colour-swapped / relation-swapped twin; 0.5 is chance).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .splits import CONVERSE, HOLDOUTS, holdout_named

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

__all__ = ["ImageTower", "ToyClip", "ToyClipConfig", "hard_negative", "info_nce", "make_text_encoder",
           "train_toy_clip", "twins"]

logger = logging.getLogger(__name__)

MAX_LOGIT_SCALE = math.log(100.0)  # CLIP clamps the learnt temperature at 1/100


@dataclass(frozen=True)
class ToyClipConfig:
    layers: int = 2
    width: int = 64
    heads: int = 4
    embed_dim: int = 64
    steps: int = 600
    batch: int = 64
    lr: float = 1e-3
    hard_negatives: float = 0.0  # share of a batch's two-object captions that bring a hard negative
    train_images: int = 4000
    eval_images: int = 256
    seed: int = 0
    holdout: str = "pairings"  # which scenes are held out (bench/shapes/splits.py); the base must use the same

    def validate(self) -> None:
        for name in ("layers", "width", "heads", "embed_dim", "steps", "batch", "train_images", "eval_images"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.width % self.heads:
            raise ValueError(f"--width ({self.width}) must be a multiple of --heads ({self.heads})")
        if not 0.0 <= self.hard_negatives <= 1.0:
            raise ValueError(f"--hard-negatives is a share of the batch, between 0 and 1; got {self.hard_negatives}")
        if not self.lr > 0:
            raise ValueError(f"--lr must be positive, got {self.lr}")
        holdout_named(self.holdout)


# --- hard negatives from the grammar ---

def _picture(spec) -> object:
    """What an image of the spec shows, independent of wording: pairs are unordered, a relation equals its converse."""

    objects = tuple((o.colour, o.shape) for o in spec.objects)
    if spec.kind == "pair":
        return frozenset(objects)
    if spec.kind == "relation":
        return frozenset({(objects, spec.relation), (objects[::-1], CONVERSE[spec.relation])})
    return spec


def _swap_colours(caption: str, a: str, b: str) -> str:
    return re.sub(rf"\b({re.escape(a)}|{re.escape(b)})\b", lambda m: b if m.group(1) == a else a, caption)


def _converse_relation(caption: str, relation: str) -> str:
    from .captions import RELATION_WORDS

    padded = f" {caption} "
    for word in sorted(RELATION_WORDS[relation], key=len, reverse=True):  # "to the left of" before "left of"
        if f" {word} " in padded:
            # the converse's synonym of the same rank keeps the register ("over" -> "under"); "beneath" has no
            # third counterpart in "above"/"over", so it takes the last one
            index = RELATION_WORDS[relation].index(word)
            words = RELATION_WORDS[CONVERSE[relation]]
            return padded.replace(f" {word} ", f" {words[min(index, len(words) - 1)]} ", 1).strip()
    raise ValueError(f"no {relation!r} wording found in {caption!r}")


def twins(caption: str) -> dict[str, str]:
    """{"colours": ..., "relation": ...}: the caption with its colours swapped and (relation scenes) its relation
    turned to the converse, worded as the original; only twins that parse to what was meant and show a
    different picture (a swap in "a red circle and a blue circle" shows the same picture: no twin)."""
    from .captions import parse_caption

    spec = parse_caption(caption)
    if len(spec.objects) != 2:
        return {}
    a, b = spec.objects
    options = {}
    if a.colour != b.colour:
        options["colours"] = (_swap_colours(caption, a.colour, b.colour),
                              ((b.colour, a.shape), (a.colour, b.shape)), spec.relation)
    if spec.relation is not None:
        options["relation"] = (_converse_relation(caption, spec.relation),
                               ((a.colour, a.shape), (b.colour, b.shape)), CONVERSE[spec.relation])
    found = {}
    for kind, (text, objects, relation) in options.items():
        twin = parse_caption(text)
        if tuple((o.colour, o.shape) for o in twin.objects) != objects or twin.relation != relation:
            raise AssertionError(f"the {kind} twin {text!r} of {caption!r} does not say what was meant")
        if _picture(twin) != _picture(spec):
            found[kind] = text
    return found


def hard_negative(caption: str, rng: np.random.Generator) -> str | None:
    """One of the caption's twins (`twins`), chosen at random; None when it has none (one object, or a
    swap that shows the same picture)."""
    options = sorted(twins(caption).values())
    return options[rng.integers(len(options))] if options else None


# --- the model ---

def make_text_encoder(tokenizer, config: ToyClipConfig):
    """CLIPTextModel as SD1.x's, scaled down: causal layers, learned positions, 77 tokens, EOS as padding."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from .tiny_base import CONTEXT_TOKENS

    return CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=config.width, intermediate_size=4 * config.width,
        num_hidden_layers=config.layers, num_attention_heads=config.heads, max_position_embeddings=CONTEXT_TOKENS,
        projection_dim=config.embed_dim, hidden_act="quick_gelu",
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))


class ImageTower(nn.Module):
    """64x64 RGB -> embed_dim: three stride-2 convolutions to 8x8, then a linear map of the whole grid."""

    def __init__(self, embed_dim: int = 64, channels: tuple[int, int, int] = (32, 64, 64)):
        super().__init__()
        layers, previous = [], 3
        for c in channels:
            layers += [nn.Conv2d(previous, c, 3, stride=2, padding=1), nn.GroupNorm(8, c), nn.SiLU()]
            previous = c
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(previous * 8 * 8, embed_dim)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(pixels).flatten(1))


class ToyClip(nn.Module):
    def __init__(self, text_encoder, config: ToyClipConfig):
        super().__init__()
        self.text_encoder = text_encoder
        self.text_projection = nn.Linear(config.width, config.embed_dim, bias=False)
        self.image_tower = ImageTower(config.embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        """Unit text embeddings from the pooled (first EOS) state; no attention mask, as SD feeds CLIP."""
        return F.normalize(self.text_projection(self.text_encoder(ids).pooler_output), dim=-1)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_tower(pixels), dim=-1)


def info_nce(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor,
             negatives: torch.Tensor | None = None) -> torch.Tensor:
    """CLIP's symmetric InfoNCE for matched unit embeddings image[i] <-> text[i]; `negatives` are extra texts
    that compete in the image-to-text direction only."""
    scale = logit_scale.clamp(max=MAX_LOGIT_SCALE).exp()
    candidates = text if negatives is None or len(negatives) == 0 else torch.cat([text, negatives])
    target = torch.arange(len(image), device=image.device)
    image_to_text = F.cross_entropy(scale * image @ candidates.T, target)
    text_to_image = F.cross_entropy(scale * text @ image.T, target)
    return (image_to_text + text_to_image) / 2


# --- training and evaluation ---

def _pixels(samples) -> torch.Tensor:
    return torch.from_numpy(np.stack([s.image for s in samples])).permute(0, 3, 1, 2).float() / 127.5 - 1


@torch.no_grad()
def evaluate(model: ToyClip, tokenizer, samples) -> dict:
    """Retrieval top-1 (image -> its caption among the set) and binding discrimination against hard negatives."""
    from .tiny_base import tokenize

    was_training = model.training
    model.eval()
    image = model.encode_image(_pixels(samples))
    text = model.encode_text(tokenize(tokenizer, [s.caption for s in samples]))
    retrieval = float(((image @ text.T).argmax(1) == torch.arange(len(samples))).float().mean())
    wins = {"colours": [], "relation": []}
    for i, s in enumerate(samples):
        for kind, twin in twins(s.caption).items():
            twin_text = model.encode_text(tokenize(tokenizer, [twin]))[0]
            wins[kind].append(float(image[i] @ text[i] > image[i] @ twin_text))
    model.train(was_training)
    return {"retrieval_top1": retrieval, "n": len(samples),
            **{f"binding_{k}": (float(np.mean(v)) if v else None) for k, v in wins.items()},
            **{f"binding_{k}_n": len(v) for k, v in wins.items()},
            "temperature": float(1 / model.logit_scale.clamp(max=MAX_LOGIT_SCALE).exp())}


def train_toy_clip(config: ToyClipConfig) -> tuple[ToyClip, object, dict]:
    """Train on train-split scenes; returns (model, tokenizer, stats)."""
    from .scenes import generate
    from .tiny_base import build_clip_tokenizer, tokenize

    config.validate()
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    start = time.perf_counter()
    heldout = holdout_named(config.holdout)
    samples = generate("train", config.train_images, config.seed, heldout)
    tokenizer = build_clip_tokenizer([s.caption for s in samples])
    pixels = _pixels(samples)
    ids = tokenize(tokenizer, [s.caption for s in samples])
    model = ToyClip(make_text_encoder(tokenizer, config), config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.01)
    warmup = max(1, config.steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (
        1 + math.cos(math.pi * min(s / config.steps, 1.0))))
    losses, negatives_used = [], 0
    model.train()
    for step in range(config.steps):
        picks = torch.randperm(len(samples), generator=generator)[:config.batch]
        negatives = []
        for i in picks.tolist():
            if len(samples[i].spec.objects) == 2 and rng.random() < config.hard_negatives:
                twin = hard_negative(samples[i].caption, rng)
                if twin is not None:
                    negatives.append(twin)
        negatives_used += len(negatives)
        image = model.encode_image(pixels[picks])
        text = model.encode_text(ids[picks])
        extra = model.encode_text(tokenize(tokenizer, negatives)) if negatives else None
        loss = info_nce(image, text, model.logit_scale, extra)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if step % 100 == 0 or step == config.steps - 1:
            logger.info("toy CLIP step %d/%d loss %.4f (%d hard negatives)", step + 1, config.steps, losses[-1],
                        len(negatives))
    model.eval()
    stats = {"config": asdict(config), "first_loss": losses[0],
             "final_loss": float(np.mean(losses[-max(1, len(losses) // 10):])),
             "hard_negatives_per_step": negatives_used / config.steps,
             "train_seconds": round(time.perf_counter() - start, 1),
             "text_parameters": sum(p.numel() for p in model.text_encoder.parameters()),
             **{split: evaluate(model, tokenizer, generate(split, config.eval_images, config.seed, heldout))
                for split in ("val", "heldout")}}
    return model, tokenizer, stats


def save(model: ToyClip, tokenizer, stats: dict, out: Path) -> Path:
    from safetensors.torch import save_file

    from .tiny_base import save_vocab_and_merges

    out.mkdir(parents=True, exist_ok=True)
    model.text_encoder.save_pretrained(out / "text_encoder", safe_serialization=True)
    tokenizer.save_pretrained(out / "tokenizer")
    save_vocab_and_merges(tokenizer, out / "tokenizer")
    towers = {k: v.contiguous() for k, v in model.state_dict().items() if not k.startswith("text_encoder.")}
    save_file(towers, str(out / "towers.safetensors"), metadata={"format": "shapes-toy-clip"})
    (out / "stats.json").write_text(json.dumps(stats, indent=1) + "\n", encoding="utf-8")
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.shapes.toy_clip", description=__doc__.split("\n\n")[0])
    d = ToyClipConfig()
    parser.add_argument("--out", type=Path, default=Path("outputs/toy-clip"))
    parser.add_argument("--layers", type=int, default=d.layers)
    parser.add_argument("--width", type=int, default=d.width)
    parser.add_argument("--heads", type=int, default=d.heads)
    parser.add_argument("--embed-dim", type=int, default=d.embed_dim)
    parser.add_argument("--steps", type=int, default=d.steps)
    parser.add_argument("--batch", type=int, default=d.batch)
    parser.add_argument("--lr", type=float, default=d.lr)
    parser.add_argument("--hard-negatives", type=float, default=d.hard_negatives,
                        help="share of two-object captions per batch that bring a swapped twin (0..1)")
    parser.add_argument("--train-images", type=int, default=d.train_images)
    parser.add_argument("--eval-images", type=int, default=d.eval_images)
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--holdout", choices=HOLDOUTS, default=d.holdout,
                        help="which scenes are held out from training (see bench/shapes/splits.py)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    config = ToyClipConfig(args.layers, args.width, args.heads, args.embed_dim, args.steps, args.batch, args.lr,
                           args.hard_negatives, args.train_images, args.eval_images, args.seed, args.holdout)
    try:
        config.validate()
    except ValueError as error:
        parser.error(str(error))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(args.threads)
    model, tokenizer, stats = train_toy_clip(config)
    save(model, tokenizer, stats, args.out)
    for split in ("val", "heldout"):
        s = stats[split]
        print(f"{split}: retrieval top-1 {s['retrieval_top1']:.3f} (of {s['n']}), binding vs colour swap "
              f"{s['binding_colours']}, vs relation swap {s['binding_relation']}")
    print(f"written: {args.out}")
    return stats


if __name__ == "__main__":
    main()
