"""The `distill` stage: teach the adapter the base model's own language from captions alone.

    python -m training.train --preset distill --base-model models/sd15-diffusers --llm models/LLM/Qwen2.5-1.5B \\
        --data captions.txt --output-dir outputs/qwen-sd15-distill
    python -m training.train --preset dynamic-kl --init-adapter outputs/qwen-sd15-distill/adapter.safetensors \\
        --base-model ... --llm ... --data datasets/my-images --output-dir outputs/qwen-sd15

What one step does:
    captions (5% replaced by the empty prompt) -> text side -> frozen LLM -> adapter -> context [B, N, C] (+ pooled)
    the same captions -> the base model's own text encoder(s) -> teacher context (+ pooled), cached on disk
    loss = per-slot MSE + distill.cosine_weight x (1 - cosine per slot), over all N slots (training/losses.py)
No image is read and the UNet never runs, so a step costs a few LLM and adapter forwards: minutes of text-only
training put a fresh adapter where the frozen UNet already understands it, before the image stage refines it.
The empty prompt maps to the teacher's empty-prompt context, which classifier-free guidance subtracts.

Captions come from `distill.captions` (or `--data` when that is empty): a `.txt` file with one caption per line,
a `.jsonl` file with one JSON object per line (key `data.caption_column`), or any dataset the image stage reads
(image folder with .txt captions, a folder with metadata.jsonl, .tar shards), of which only the captions are used.
Checkpoints, `--resume latest`, EMA and the exported `adapter.safetensors` work as in the image stage.

Published architectures distill too (`--arch rouwei-gemma`, or `--init-adapter` on a RouWei file), through
their own text side (training.conditioning.encode_for, the node's code). An adapter whose N is k times the
teacher's 77 tokens (RouWei's 308 = 4 x 77) regresses each of its k chunks onto the teacher's context
(`teacher_target`): cross-attention over k copies of a context equals attention over one, so that target
makes the frozen UNet see exactly the teacher. An N that is no multiple of 77 (ELLA's 64 latents) has no
such target and is refused before anything is computed.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from training.conditioning import encode_for
from training.config import TrainConfig, TrainConfigError
from training.distributed import end_run
from training.data import DatasetError, decode_caption, find_candidates
from training.latent_cache import TensorStore
from training.losses import distillation_loss
from training.models import BaseModel, BaseModelError
from training.state_cache import StateCache, distinct_captions, weights_digest

log = logging.getLogger("training.distill")

TEACHER_CACHE_VERSION = "1"


# ---------------------------------------------------------------------------------------------
# captions


@dataclass
class CaptionSet:
    """The captions of a caption source, repeats kept: a caption that is frequent in the data is frequent in
    training, as in the image stage. `samples` and `name` are what the exported provenance records."""

    samples: list[str]
    name: str


def read_captions(path: str, caption_column: str = "text", name: str = "") -> CaptionSet:
    """The non-empty captions (stripped, repeats kept, in source order) of a .txt / .jsonl caption file or the
    caption column of a dataset.

    Blank captions are dropped: the empty prompt is trained through caption dropout (data.caption_dropout),
    at the rate the run asks for, not at whatever rate a file happens to contain it."""
    if not path:
        raise DatasetError("no captions given: pass --data <captions.txt | captions.jsonl | dataset> "
                           "(or --set distill.captions=...)")
    source = Path(path)
    skipped: list[str] = []
    if source.is_file() and source.suffix == ".txt":
        captions = [text for number, raw in enumerate(source.read_bytes().splitlines(), 1)
                    if (text := decode_caption(raw, f"{source.name} line {number}", skipped)) is not None]
    elif source.is_file() and source.suffix == ".jsonl":
        captions = []
        for number, raw in enumerate(source.read_bytes().splitlines(), 1):
            line = decode_caption(raw, f"{source.name} line {number}", skipped)
            if line is None or not line.strip():
                continue
            try:
                row = json.loads(line)
                captions.append(str(row[caption_column]))
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise DatasetError(f"{source} line {number}: expected a JSON object with a {caption_column!r} key "
                                   f"({type(err).__name__}: {err}); set data.caption_column") from None
    elif (found := find_candidates(path, "file_name", caption_column, skipped)) is not None:
        captions = [c for _, c, _, _ in found[1]]
    else:
        raise DatasetError(f"caption source {path} does not exist: pass a .txt file (one caption per line), a .jsonl "
                           "file, an image folder with .txt captions, a folder with metadata.jsonl, or .tar shards")
    kept = [c.strip() for c in captions if c.strip()]
    if not kept:
        raise DatasetError(f"{path} holds no non-empty captions" + (f" ({'; '.join(skipped[:5])})" if skipped else ""))
    if skipped:
        log.warning("skipped %d caption(s): %s", len(skipped), "; ".join(skipped[:20]))
    log.info("captions: %d (%d distinct) from %s", len(kept), len(set(kept)), path)
    return CaptionSet(kept, name or source.stem or source.name)


# ---------------------------------------------------------------------------------------------
# the teacher's contexts


def teacher_fingerprint(base: BaseModel) -> str:
    """sha256 over the text encoders' weights and the tokenizers' vocabularies: other weights or another
    tokenizer mean other contexts, so a cache entry can never be served stale."""
    digest = hashlib.sha256(f"teacher|{TEACHER_CACHE_VERSION}|{base.family}".encode())
    for encoder, tokenizer in zip(base.text_encoders, base.tokenizers):
        weights_digest(digest, encoder.state_dict())
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    return digest.hexdigest()


class TeacherContexts:
    """The base model's own conditioning per caption: computed by `BaseModel.encode_clip` (the same call the
    image stage's teacher uses), kept on disk per caption when `folder` is given, else computed per batch."""

    def __init__(self, base: BaseModel, device, folder: Optional[Path] = None):
        if not base.text_encoders:
            raise BaseModelError(f"{base.name} has no text encoder: distillation needs the base model's own "
                                 "text encoder as the teacher")
        self.base, self.device = base, device
        self.store = TensorStore(folder) if folder is not None else None
        self.prefix = teacher_fingerprint(base) + "|" if folder is not None else ""

    def key(self, caption: str) -> str:
        return hashlib.sha256((self.prefix + caption).encode("utf-8")).hexdigest()

    def _compute(self, captions: list[str]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        context, pooled = self.base.encode_clip(captions, self.device)
        return context.float(), None if pooled is None else pooled.float()

    def fill(self, captions: list[str], batch_size: int) -> None:
        """Compute and store every caption of `captions` that has no entry yet (no-op without a cache)."""
        if self.store is None:
            return
        missing = [c for c in captions if not self.store.path(self.key(c)).is_file()]
        for start in range(0, len(missing), batch_size):
            chunk = missing[start:start + batch_size]
            context, pooled = self._compute(chunk)
            for i, caption in enumerate(chunk):
                entry = {"context": context[i]}
                if pooled is not None:
                    entry["pooled"] = pooled[i]
                self.store.put(self.key(caption), entry)
        if missing:
            log.info("teacher-context cache: computed %d of %d captions into %s", len(missing), len(captions),
                     self.store.folder)

    def get(self, prompts: list[str]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(context [B, N, C], pooled [B, P] or None) in fp32 on the device, for `prompts` ("" included)."""
        if self.store is None:
            return self._compute(prompts)
        entries = [self.store.get(self.key(p)) for p in prompts]
        if any(e is None for e in entries):  # e.g. written on a disk this node cannot see
            self.fill([p for p, e in zip(prompts, entries) if e is None], len(prompts))
            entries = [self.store.get(self.key(p)) for p in prompts]
        context = torch.stack([e["context"] for e in entries]).to(self.device)
        pooled = torch.stack([e["pooled"] for e in entries]).to(self.device) if "pooled" in entries[0] else None
        return context, pooled


def teacher_target(context: torch.Tensor, tokens: int) -> torch.Tensor:
    """The teacher's context [B, T, C] as a target for an adapter of `tokens` = k x T tokens: k copies in a row.

    Exact, not an approximation: for any query, softmax attention over k copies of the keys gives each copy
    1/k of the weight the single key had, so the attended sum, and so everything the UNet computes from its
    context, is unchanged. ValueError when `tokens` is no multiple of T."""
    if tokens % context.shape[1]:
        raise ValueError(f"an adapter of {tokens} tokens has no slot-wise target in a {context.shape[1]}-token "
                         "teacher context (it needs a multiple of it)")
    return context.repeat(1, tokens // context.shape[1], 1)


def check_distillable(adapter: nn.Module, llm, template, base: BaseModel, device, name: str) -> int:
    """The adapter's token count, once checked to be a multiple of the teacher's (one empty-prompt forward of
    each); TrainConfigError naming both counts and what to do otherwise."""
    with torch.no_grad():
        encoded = encode_for(adapter, llm, template, [""])
        tokens = adapter(encoded.hidden_states, encoded.attention_mask, torch.zeros(1, dtype=torch.long, device=device)
                         ).context.shape[1]
        teacher = base.encode_clip([""], device)[0]
    try:
        teacher_target(teacher, tokens)
    except ValueError:
        teacher_tokens = teacher.shape[1]
        raise TrainConfigError(
            f"the distill stage regresses {name}'s {tokens} output tokens slot by slot onto the base's "
            f"{teacher_tokens}-token text-encoder context (or k copies of it), and {tokens} is no multiple of "
            f"{teacher_tokens}: train it with an image preset instead (e.g. --preset dynamic-kl, whose teacher term "
            f"compares the UNet's outputs, not the slots), or, for a fresh ELLA module, give it "
            f"--set ella.num_latents={teacher_tokens}") from None
    return tokens


@torch.no_grad()
def start_from_teacher(adapter, teacher: TeacherContexts, captions: list[str], count: int, seed: int,
                       batch_size: int) -> None:
    """Start a fresh adapter's output at the teacher's per-channel statistics (LLMDiffAdapter.start_at) over a
    seeded sample of `count` captions plus the empty prompt, so every channel begins where the UNet reads it."""
    pick = torch.randperm(len(captions), generator=torch.Generator().manual_seed(seed))[:max(1, count)].tolist()
    sample = [captions[i] for i in pick] + [""]
    parts = [teacher.get(sample[i:i + batch_size]) for i in range(0, len(sample), batch_size)]
    context = torch.cat([c for c, _ in parts]).cpu()
    pooled = torch.cat([p for _, p in parts]).cpu() if parts[0][1] is not None else None
    adapter.start_at(context, pooled, per_channel=True)


# ---------------------------------------------------------------------------------------------
# the stage


class Distiller(nn.Module):
    """The adapter and the distillation forward: the one module accelerate wraps (the LLM and the teacher stay outside)."""

    def __init__(self, adapter: nn.Module, cosine_weight: float, pooled_weight: float):
        super().__init__()
        self.adapter = adapter
        self.cosine_weight, self.pooled_weight = cosine_weight, pooled_weight

    def forward(self, hidden_states, attention_mask, timesteps, teacher_context, teacher_pooled):
        out = self.adapter(hidden_states, attention_mask, timesteps)
        loss, mse, cos_gap = distillation_loss(out.context, teacher_target(teacher_context, out.context.shape[1]),
                                               self.cosine_weight)
        logs = {"distill/context_mse": float(mse), "distill/context_1_minus_cos": float(cos_gap)}
        if teacher_pooled is not None and out.pooled is not None:
            pooled_loss, pooled_mse, _ = distillation_loss(out.pooled, teacher_pooled, self.cosine_weight)
            loss = loss + self.pooled_weight * pooled_loss
            logs["distill/pooled_mse"] = float(pooled_mse)
        logs["loss/total"] = float(loss.detach())
        return loss, logs


def distill(cfg: TrainConfig, rank: int, world: int, local_rank: int, started_from: Optional[dict] = None) -> int:
    """Run the distill stage (stage = "distill"); the same setup, checkpoints, export and end of run as the image stage.
    `started_from` ({'preset', 'config_file'}) is recorded in the exported file."""
    from training.train import (EMA, BatchOrder, PhaseTimer, RunLog, TrainingStopped, export, lr_factor, optimizer_step,
                                restore_checkpoint, save_checkpoint, setup_run, step_generator, write_timings)

    # 1. Models: the base model is loaded for its text encoders (the teacher) and to check the adapter fits it.
    device, weight_dtype, out_dir, resume_from, base, llm, adapter = setup_run(cfg, rank, local_rank)
    template = getattr(adapter.config, "template", None)  # a published file's text side is its own (encode_for)
    name = (Path(cfg.model.init_adapter).name if cfg.model.init_adapter
            else "the fresh adapter" if cfg.model.arch == "ours" else f"the fresh {cfg.model.arch} module")
    check_distillable(adapter, llm, template, base, device, name)

    # 2. Captions and the caches (each process its share, no communication yet).
    captions = read_captions(cfg.distill.captions or cfg.data.path, cfg.data.caption_column, cfg.data.name)
    everything = distinct_captions(captions.samples)  # plus "", caption dropout's empty prompt
    folder = Path(cfg.distill.teacher_cache_dir or out_dir / "teacher_cache") if cfg.distill.cache_teacher else None
    teacher = TeacherContexts(base, device, folder)
    teacher.fill(everything[rank::world], cfg.batch_size)
    llm_states = None
    if cfg.data.cache_llm_states:
        llm_states = StateCache(Path(cfg.data.llm_cache_dir or out_dir / "llm_state_cache"), llm, template)
        llm_states.check_budget(everything, cfg.data.llm_cache_max_gb)
        llm_states.fill(everything[rank::world], cfg.batch_size)

    # 3. Multi-process communication starts here.
    from accelerate import Accelerator

    accelerator = Accelerator(mixed_precision=cfg.mixed_precision if device.type == "cuda" else "no", cpu=device.type == "cpu")
    is_main = accelerator.is_main_process
    accelerator.wait_for_everyone()
    teacher.fill(everything, cfg.batch_size)
    if llm_states is not None:
        llm_states.fill(everything, cfg.batch_size)
    # Only our adapter has start_at; a fresh ELLA / RouWei module starts from its own initialisation.
    if cfg.distill.start_per_channel and not cfg.model.init_adapter and resume_from is None and hasattr(adapter, "start_at"):
        start_from_teacher(adapter, teacher, captions.samples, cfg.distill.start_captions, cfg.seed, cfg.batch_size)

    timer = PhaseTimer(device, cfg.time_phases)
    model = Distiller(adapter, cfg.distill.cosine_weight, cfg.distill.pooled_weight)
    optimizer = torch.optim.AdamW([{"params": list(adapter.parameters()), "lr": cfg.optim.lr,
                                    "weight_decay": cfg.optim.weight_decay, "name": "adapter"}],
                                  betas=(cfg.optim.beta1, cfg.optim.beta2), eps=cfg.optim.eps)
    model, optimizer = accelerator.prepare(model, optimizer)
    raw = accelerator.unwrap_model(model)
    trainable = {n: p for n, p in raw.named_parameters() if p.requires_grad}
    ema = EMA(raw.adapter, cfg.ema_decay) if cfg.ema_decay > 0 else None
    progress = restore_checkpoint(resume_from, trainable, ema, optimizer, device, is_main, cfg.max_steps)
    total = cfg.max_steps
    num_timesteps = int(base.scheduler.config.num_train_timesteps)

    meter = RunLog(out_dir, is_main, total, progress.step, desc="distill")
    process = accelerator.process_index
    one_bucket = [0] * len(captions.samples)  # captions have no shape
    order = BatchOrder(one_bucket, cfg.batch_size, cfg.seed, progress.epoch, process, accelerator.num_processes)
    meter.start_clock()
    while progress.step < total:
        step, started = progress.step, (time.perf_counter(), time.process_time())
        with timer("data"):
            chosen = [captions.samples[i] for i in order.next(progress)]
            gen = step_generator(cfg.seed, step, process)
            torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=gen)))  # adapter dropout, if any
            drop = (torch.rand(len(chosen), generator=gen) < cfg.data.caption_dropout).tolist()
            prompts = ["" if d else c for d, c in zip(drop, chosen)]  # "" -> the teacher's empty-prompt context
            # a timestep-aware adapter learns the teacher's (timestep-free) context at every t; a static one ignores t
            timesteps = torch.randint(0, num_timesteps, (len(prompts),), generator=gen).to(device)
        with timer("teacher"):
            teacher_context, teacher_pooled = teacher.get(prompts)
        with timer("llm"), torch.no_grad():
            encoded = llm_states.encode(prompts) if llm_states is not None else encode_for(adapter, llm, template, prompts)
        for group in optimizer.param_groups:
            group["lr"] = cfg.optim.lr * lr_factor(step, total, cfg.optim.warmup_steps, cfg.optim.schedule)
        with timer("student"):
            loss, logs = model(encoded.hidden_states, encoded.attention_mask, timesteps, teacher_context, teacher_pooled)
            accelerator.backward(loss)
        with timer("optimizer"):
            finite, grad_norm, losses = optimizer_step(accelerator, loss, trainable, optimizer, ema, raw.adapter, step,
                                                       cfg.optim.grad_clip)
        if not finite:
            progress.nonfinite += 1
            log.warning("step %d: non-finite distillation loss/gradient, step skipped (%d of at most %d)", step,
                        progress.nonfinite, cfg.max_nonfinite_steps)
            if progress.nonfinite > cfg.max_nonfinite_steps:
                raise TrainingStopped(f"stopping at step {step}: {progress.nonfinite} steps had a non-finite loss or "
                                      f"gradient (limit max_nonfinite_steps={cfg.max_nonfinite_steps}); lower optim.lr")
        progress.step = step = step + 1
        meter.step_done(step, started, losses, grad_norm, optimizer.param_groups[0]["lr"], logs, cfg.log_every)
        if step % cfg.checkpoint_every == 0 or step == total or step == cfg.debug.stop_after_step:
            save_checkpoint(accelerator, is_main, cfg, out_dir, progress, trainable, ema, optimizer, raw.adapter)
        if step == cfg.debug.stop_after_step:
            log.warning("debug.stop_after_step=%d reached: exiting as if preempted", step)
            meter.bar.close()
            end_run(rank, world, accelerator.wait_for_everyone, accelerator.end_training)
            return 3
    meter.bar.close()
    accelerator.wait_for_everyone()
    if is_main:
        export(cfg, raw, ema, base, llm, captions, progress.step, out_dir, started_from)
        write_timings(timer, meter, out_dir)
        meter.writer.close()
    end_run(rank, world, accelerator.wait_for_everyone, accelerator.end_training)  # as in the image stage
    return 0
