"""Train an LLM Diff Adapter for a Stable Diffusion base model (SD1.5, SD2, SDXL) and a decoder-only LLM.

One GPU:
    python -m training.train --base-model models/sd15-diffusers --llm models/LLM/Qwen2.5-1.5B \\
        --data datasets/my-images --output-dir outputs/qwen-sd15 --max-steps 20000 --batch-size 16 \\
        --mixed-precision bf16
Many GPUs or nodes (DDP; DeepSpeed / FSDP through accelerate's own config file):
    accelerate launch --multi_gpu --num_processes 8 -m training.train --config my-run.toml
Two processes on a CPU (what the tests do; `accelerate launch --cpu` starts only one without MPI):
    torchrun --nproc_per_node 2 -m training.train --config my-run.toml
A preempted job continues exactly where it stopped when rerun with the same command plus:
    --resume latest        (starts fresh, and says so, when there is no checkpoint yet)
Bootstrap from captions first (no images, no UNet forward: training/distill.py), then train on images from it:
    python -m training.train --preset distill --data captions.txt ... --output-dir outputs/distill
    python -m training.train --init-adapter outputs/distill/adapter.safetensors --data datasets/my-images ...

What one step does (docs/design.md sections 2, 4, 5):
    latents (VAE, cached on disk) + noise at a random timestep -> x_t
    prompt -> template -> frozen LLM -> every layer's states -> adapter -> context (+ pooled for SDXL)
    student = UNet(x_t, t, adapter context)             -- gradients flow into the adapter (and UNet LoRA)
    teacher = the same frozen UNet(x_t, t, its own CLIP context), only while the loss schedule needs it
    loss = weighted epsilon-MSE + annealed, gated KL to the teacher (training/losses.py)
The result, <output-dir>/adapter.safetensors, is exactly the file the ComfyUI nodes load; with EMA on
(the default) it holds the EMA weights.

--init-adapter also takes a published RouWei-Gemma / RouWei-T5Gemma / ELLA file (adapter/foreign): its text side
is adapter.foreign.text.encode_text (the node's code), ELLA runs at each sample's training timestep, and the export
keeps the file's own key layout and dtype (docs/training_public_adapters.md).

Precedence of settings: defaults < --preset < --config < named flags < --set key=value (training/config.py).
Test-only hooks live under [debug] (debug.inject_nan_at_step, debug.stop_after_step; training/debug.py).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import sys
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from adapter import (
    AdapterConfig,
    AdapterError,
    LLMDiffAdapter,
    check_context_dim,
    check_llm_matches,
    load_llm,
    make_target,
    record_chat_template,
    save_adapter,
)
from adapter.file_format import read_header
from adapter.foreign import is_foreign, load_any_adapter, save_foreign_adapter
from adapter.foreign.scratch import OURS_LAYOUT, fresh_module, to_adapter_config
from adapter.foreign.text import check_pairing, node_text_side
from training import checkpoint as ckpt
from training.conditioning import adapter_context, adapter_context_at, encode_for
from training.config import (DEFAULT_PRESET, TrainConfig, TrainConfigError, format_config, missing_inputs, resolve_config,
                             shareable_dict)
from training.data import Dataset, DatasetError, describe_skipped, epoch_batches, load_pixels, scan_dataset
from training.debug import nan_in_adapter_output
from training.distributed import end_run
from training.latent_cache import LatentCache, fill, vae_fingerprint
from training.lora import add_unet_lora, export_comfy_lora, lora_disabled
from training.losses import DiffusionLoss
from training.models import BaseModel, BaseModelError, load_base_model
from training.output_lock import OutputDirLocked, OutputLock
from training.sampling import ddim_sample
from training.state_cache import StateCache, distinct_captions

log = logging.getLogger("training.train")

DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class TrainingStopped(RuntimeError):
    """The run cannot go on (e.g. too many non-finite steps); the message says why and what to try."""


# ---------------------------------------------------------------------------------------------
# small pieces, in the order the loop uses them


class PhaseTimer:
    """Wall time per phase (data, llm, teacher, student, optimizer); syncs the GPU so time lands in the right phase."""

    def __init__(self, device: torch.device, enabled: bool):
        self.totals: dict[str, float] = defaultdict(float)
        self.sync = enabled and device.type == "cuda"
        self.enabled = enabled

    @contextmanager
    def __call__(self, name: str):
        if not self.enabled:
            yield
            return
        if self.sync:
            torch.cuda.synchronize()
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.sync:
                torch.cuda.synchronize()
            self.totals[name] += time.perf_counter() - start


def step_generator(seed: int, step: int, rank: int) -> torch.Generator:
    """Each step's randomness is a pure function of (seed, step, rank): resuming needs no saved RNG state."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 1009 + rank)


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Linear warmup, then constant or cosine down to 10%; a pure function of the step, so a longer
    --max-steps on resume simply recomputes the curve over the new total."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


class EMA:
    """Exponential moving average of the adapter's weights (with the usual (1+n)/(10+n) warm-up)."""

    def __init__(self, module: nn.Module, decay: float):
        self.decay = decay
        self.shadow = {n: p.detach().float().clone() for n, p in module.named_parameters()}

    @torch.no_grad()
    def update(self, module: nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        for n, p in module.named_parameters():
            self.shadow[n].mul_(d).add_(p.detach().float(), alpha=1 - d)


@dataclass
class Progress:
    """Where a run stands: what a checkpoint records beside the weights, and what resuming restores."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # the data epoch
    position: int = 0  # the next batch of that epoch
    nonfinite: int = 0  # steps skipped so far for a non-finite loss or gradient


class BatchOrder:
    """The batches of each data epoch (training.data.epoch_batches: shuffled per epoch, split across processes),
    walked from a Progress: a run resumed at (epoch, position) draws exactly the batches it would have drawn."""

    def __init__(self, bucket_of: list[int], batch_size: int, seed: int, epoch: int, process: int, processes: int):
        self.args = (bucket_of, batch_size, seed)
        self.process, self.processes = process, processes
        self.batches = epoch_batches(*self.args, epoch, process, processes)

    def next(self, progress: Progress) -> list[int]:
        """The sample indices of the batch at `progress` (moving it on, into the next epoch after the last batch)."""
        if progress.position >= len(self.batches):
            progress.epoch, progress.position = progress.epoch + 1, 0
            self.batches = epoch_batches(*self.args, progress.epoch, self.process, self.processes)
        progress.position += 1
        return self.batches[progress.position - 1]


class RunLog:
    """A run's progress bar and TensorBoard scalars (main process only) and every step's wall and CPU seconds
    (what write_timings sums up); both stages log through it."""

    def __init__(self, out_dir: Path, is_main: bool, total: int, initial: int, desc: str):
        self.is_main, self.total = is_main, total
        self.writer = None
        if is_main:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(out_dir / "logs"))
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, initial=initial, disable=not is_main, desc=desc, dynamic_ncols=True)
        self.step_times: list[float] = []  # wall seconds per step
        self.step_cpu_times: list[float] = []  # CPU seconds of this process per step (robust to other load on a shared CPU)
        self.start = time.perf_counter()

    def start_clock(self) -> None:
        """The run's wall time (write_timings' `wall_s`) counts from here: right before the first step."""
        self.start = time.perf_counter()

    def step_done(self, step: int, started: tuple[float, float], losses: torch.Tensor, grad_norm, lr: float, logs: dict,
                  every: int) -> bool:
        """Record the step that began at `started` ((perf_counter, process_time)) and ends now, `step` steps done;
        the main process moves the bar and, every `every` steps and at the last, writes the scalars: True then."""
        self.step_times.append(time.perf_counter() - started[0])
        self.step_cpu_times.append(time.process_time() - started[1])
        mean_loss = float(losses.mean())  # averaged over processes
        if not self.is_main:
            return False
        self.bar.set_postfix(loss=f"{mean_loss:.4f}", it_s=f"{1 / max(self.step_times[-1], 1e-9):.2f}")
        self.bar.update(1)
        if not (step % every == 0 or step == self.total):
            return False
        self.write(step, {**logs, "loss/mean_over_ranks": mean_loss, "grad_norm": float(grad_norm), "lr": lr})
        return True

    def write(self, step: int, scalars: dict[str, float]) -> None:
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, step)


class Student(nn.Module):
    """Everything trained (adapter, UNet LoRA, learned loss weighting) and the forward that trains it;
    the one module accelerate wraps in DDP. The frozen LLM, VAE and text encoders are held outside
    the module tree, so DDP neither broadcasts nor tracks them."""

    def __init__(self, adapter: LLMDiffAdapter, base: BaseModel, llm, loss_fn: DiffusionLoss, cfg: TrainConfig,
                 timer: PhaseTimer, template, llm_states: Optional[StateCache] = None):
        super().__init__()
        self.adapter = adapter
        self.loss_fn = loss_fn
        if cfg.lora.enabled:  # the UNet joins the module tree only when it has trainable (LoRA) weights
            self.unet = base.unet
        self.frozen = (base, llm)  # a tuple: not registered as submodules
        self.cfg, self.timer, self.template = cfg, timer, template
        self.llm_states = llm_states  # the opt-in LLM-state cache; None = run the LLM on each step's captions

    def forward(self, latents, noise, timesteps, prompts, sizes, step: int, total_steps: int):
        base, llm = self.frozen
        x_t = base.scheduler.add_noise(latents, noise, timesteps)
        need_teacher = self.loss_fn.needs_teacher(step, total_steps)
        clip_context = clip_pooled = teacher_eps = None
        with self.timer("teacher"):
            if need_teacher or self.cfg.model.concat_clip:
                clip_context, clip_pooled = base.encode_clip(prompts, latents.device)
            if need_teacher:
                with torch.no_grad(), lora_disabled(base.unet):
                    teacher_eps = base.predict_eps(x_t, timesteps, clip_context, clip_pooled, sizes)
        with self.timer("llm"):
            with torch.no_grad():
                encoded = (self.llm_states.encode(prompts) if self.llm_states is not None
                           else encode_for(self.adapter, llm, self.template, prompts))
        with self.timer("student"):
            context, pooled = adapter_context(self.adapter, encoded, clip_context if self.cfg.model.concat_clip else None,
                                              timesteps)
            student_eps = base.predict_eps(x_t, timesteps, context, pooled, sizes)
            loss, logs = self.loss_fn(noise, student_eps, teacher_eps, timesteps, step, total_steps)
        return loss, logs


# ---------------------------------------------------------------------------------------------
# setup: models, adapter, data, latent cache (all before any multi-process communication)


def build_adapter(cfg: TrainConfig, llm, base: BaseModel) -> nn.Module:
    """Fresh adapter for this LLM and base (what `python -m adapter init` makes), or --init-adapter checked to fit:
    one of our files, or a published RouWei-Gemma / RouWei-T5Gemma / ELLA file (recognised by its key layout)."""
    # Seeded on both paths: a fresh adapter's weights, and the UNet LoRA initialised right after, are part of the
    # run's seed (else a fine-tune with LoRA would start from another random LoRA on every run, resumes included).
    torch.manual_seed(cfg.seed)
    if cfg.model.init_adapter:
        adapter = load_any_adapter(cfg.model.init_adapter)
        config = adapter.config
        name = Path(cfg.model.init_adapter).name
        if is_foreign(config):
            check_pairing(config, llm, name)
            if cfg.data.cache_llm_states:
                raise TrainConfigError(f"--init-adapter {name} is a published {config.preset} adapter, whose text side the "
                                       "LLM-state cache does not hold: leave data.cache_llm_states off for it")
            # Exported in the dtype the file came in, so the other packs get what they always got.
            dtypes = {v["dtype"] for k, v in read_header(cfg.model.init_adapter).items() if k != "__metadata__"}
            adapter.file_dtype = {"F16": torch.float16, "BF16": torch.bfloat16}.get(dtypes.pop(), torch.float32) \
                if len(dtypes) == 1 else torch.float32
        else:
            check_llm_matches(config, llm.info, llm.tokenizer)
        where = f"the base model {base.name} ({base.family})"
        check_context_dim(config, base.context_dim, base.pooled_dim if base.family == "sdxl" else None, where)
        if config.concat_clip != cfg.model.concat_clip:
            raise AdapterError(
                f"--init-adapter {cfg.model.init_adapter} was trained with concat_clip={config.concat_clip} but this run "
                f"has concat_clip={cfg.model.concat_clip}: pass --concat-clip accordingly")
        log.info("fine-tuning %s (%s); its own arch and %s govern ([arch]/[template] settings are ignored)",
                 cfg.model.init_adapter, config.describe() if is_foreign(config) else "ours",
                 "text side" if is_foreign(config) else "template")
        if is_foreign(config):
            return adapter.float().train()
    else:
        target = make_target(base.family, num_tokens=cfg.model.num_tokens, context_dim=base.context_dim,
                             pooled_dim=base.pooled_dim)
        if cfg.model.arch != "ours":  # a fresh ELLA / RouWei module, kept in our format with its text side
            sizes = cfg.ella if cfg.model.arch == "ella" else cfg.rouwei
            adapter = fresh_module(cfg.model.arch, sizes, llm, target, record_chat_template(cfg.template, llm.tokenizer))
            log.info("fresh %s: %s", cfg.model.arch, adapter.config.describe())
            return adapter.float().train()
        # The chat template is recorded, so every path (ComfyUI's single files too) renders the same tokens.
        config = AdapterConfig(llm=llm.info, target=target, template=record_chat_template(cfg.template, llm.tokenizer),
                               arch=dataclasses.replace(cfg.arch), concat_clip=cfg.model.concat_clip)
        adapter = LLMDiffAdapter(config)
        if base.text_encoders:  # start from the base's own empty-prompt conditioning (LLMDiffAdapter.start_at)
            with torch.no_grad():
                context, pooled = base.encode_clip([""], next(base.text_encoders[0].parameters()).device)
            adapter.start_at(context[0].cpu(), None if pooled is None else pooled[0].cpu())
    adapter.set_attention_backend(cfg.model.attention_backend)
    return adapter.float().train()


def cache_latents(cfg: TrainConfig, dataset: Dataset, base: BaseModel, rank: int, world: int,
                  device) -> tuple[LatentCache, list[str]]:
    """The pre-step: this process encodes every world-th image. No collective runs here, by design."""
    folder = Path(cfg.data.latent_cache_dir or Path(cfg.output_dir) / "latent_cache")
    cache = LatentCache(folder, vae_fingerprint(base.vae))
    mine = list(range(rank, len(dataset.samples), world))
    _, failed = fill(dataset, cache, base.encode_images, mine, device, show_progress=rank == 0)
    return cache, failed


def without(dataset: Dataset, bad_names: list[str]) -> Dataset:
    """The dataset minus samples that failed to decode (named in `bad_names` as 'name: reason')."""
    bad = {b.split(": unreadable", 1)[0] for b in bad_names}
    keep = [i for i, s in enumerate(dataset.samples) if s.name not in bad]
    if not keep:
        raise DatasetError(f"every image in {dataset.name} failed to decode: {'; '.join(bad_names[:10])}")
    return Dataset([dataset.samples[i] for i in keep], dataset.buckets, [dataset.bucket_of[i] for i in keep],
                   dataset.name, dataset.skipped + bad_names)


def load_batch(dataset: Dataset, indices: list[int], keys: Optional[dict[int, str]], cache: Optional[LatentCache],
               base: BaseModel, device) -> tuple[torch.Tensor, torch.Tensor, list[str], list[str]]:
    """Latents [B, 4, h, w], sizes [B, 6], captions, names; from the latent cache or through the VAE."""
    if cache is not None:
        entries = [cache.get(keys[i]) for i in indices]
        latents = torch.stack([e["latent"] for e in entries]).to(device)
        sizes = torch.stack([e["sizes"] for e in entries]).to(device)
    else:
        pixels, sizes = zip(*(load_pixels(dataset.samples[i], dataset.buckets[dataset.bucket_of[i]]) for i in indices))
        latents = base.encode_images(torch.stack(pixels).to(device)).float()
        sizes = torch.stack(sizes).to(device)
    samples = [dataset.samples[i] for i in indices]
    return latents, sizes, [s.caption for s in samples], [s.name for s in samples]


# ---------------------------------------------------------------------------------------------
# validation images


@torch.no_grad()
def validation_images(base: BaseModel, adapter: nn.Module, llm, cfg: TrainConfig, size: tuple[int, int], device):
    """Sample the fixed validation prompts with DDIM and classifier-free guidance against the empty prompt."""
    from PIL import Image

    prompts = list(cfg.validation.prompts)
    all_prompts = prompts + [""] * len(prompts)
    clip_context = base.encode_clip(all_prompts, device)[0] if cfg.model.concat_clip else None
    context_at = adapter_context_at(adapter, llm, all_prompts, clip_context)
    arrays = ddim_sample(base, context_at, len(prompts), size, cfg.validation.steps, cfg.validation.guidance,
                         cfg.validation.seed, device)
    return [Image.fromarray(a) for a in arrays.numpy()]


# ---------------------------------------------------------------------------------------------
# the run


def main(argv: Optional[list[str]] = None) -> int:
    try:
        cfg, args = resolve_config(argv)
    except TrainConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    missing = missing_inputs(cfg)
    if missing and not args.print_config:  # before printing anything: a bare command gets one short answer
        print(f"error: missing required input(s): {', '.join(missing)}. Pass them as flags or in a --config TOML "
              "file; `python -m training.train --help` lists every option, the presets and example commands.",
              file=sys.stderr)
        return 2
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s")
    if rank == 0:
        print("resolved config:\n" + format_config(cfg), flush=True)
    if args.print_config:
        return 0
    lock = None
    try:
        if rank == 0:  # one run per output folder; the other ranks of this run share it
            lock = OutputLock.acquire(cfg.output_dir)
        started_from = {"preset": args.preset or DEFAULT_PRESET, "config_file": args.config.name if args.config else ""}
        if cfg.stage == "distill":  # captions only (training/distill.py)
            from training.distill import distill

            return distill(cfg, rank, world, local_rank, started_from=started_from)
        return train(cfg, rank, world, local_rank, started_from=started_from)
    except (AdapterError, BaseModelError, DatasetError, TrainConfigError, ckpt.CheckpointError, TrainingStopped,
            OutputDirLocked) as err:
        log.error("%s", err)
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 1
    finally:
        if lock is not None:
            lock.release()


def setup_run(cfg: TrainConfig, rank: int, local_rank: int):
    """What every stage starts with: (device, weight dtype, output folder, checkpoint to resume from or None,
    base model, LLM, adapter), the models loaded and checked to fit together before any data work."""
    device = torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    weight_dtype = DTYPES[cfg.mixed_precision] if device.type == "cuda" else torch.float32
    out_dir = Path(cfg.output_dir)
    resume_from = ckpt.resolve_resume(cfg.resume, out_dir)
    if cfg.resume == "latest" and resume_from is None and rank == 0:
        print(f"--resume latest: no checkpoint in {ckpt.checkpoints_dir(out_dir)} yet, starting fresh", flush=True)
    base = load_base_model(cfg.model.base_model, cfg.model.base_model_config, cfg.model.family, device, weight_dtype)
    if not cfg.model.llm:
        raise TrainConfigError("no LLM given: pass --llm <Hugging Face-format LLM folder>")
    llm_dtype = weight_dtype if cfg.model.llm_dtype == "auto" else DTYPES[cfg.model.llm_dtype]
    llm = load_llm(cfg.model.llm, dtype=llm_dtype, device=device)
    adapter = build_adapter(cfg, llm, base).to(device)
    return device, weight_dtype, out_dir, resume_from, base, llm, adapter


@dataclass
class ImageRun:
    """Everything the image stage's loop works with, built by setup_image_stage (in the order it builds them)."""

    cfg: TrainConfig
    device: torch.device
    out_dir: Path
    resume_from: Optional[Path]  # the checkpoint to continue from, None for a fresh run
    base: BaseModel
    llm: object
    dataset: Dataset
    cache: Optional[LatentCache]  # the VAE latents on disk (None: encode each batch)
    keys: Optional[dict[int, str]]  # sample index -> its latent-cache key
    accelerator: object
    timer: PhaseTimer
    student: nn.Module  # as accelerate prepared it (DDP-wrapped on many processes)
    raw: Student  # the same module, unwrapped
    optimizer: torch.optim.Optimizer
    base_lrs: list[float]  # each parameter group's learning rate before the schedule
    trainable: dict[str, nn.Parameter]
    ema: Optional[EMA]

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process


def train(cfg: TrainConfig, rank: int, world: int, local_rank: int, started_from: Optional[dict] = None) -> int:
    """The image stage: setup, resume, the loop, export. `started_from` ({'preset', 'config_file'}) is recorded in the
    exported file. Returns 0, or 3 when debug.stop_after_step ended the run as a preemption would."""
    run = setup_image_stage(cfg, rank, world, local_rank)
    progress = restore_checkpoint(run.resume_from, run.trainable, run.ema, run.optimizer, run.device, run.is_main,
                                  cfg.max_steps)
    meter = RunLog(run.out_dir, run.is_main, cfg.max_steps, progress.step, desc="train")
    finished = image_loop(run, progress, meter)
    if finished:
        finish_image_stage(run, progress, meter, started_from)
    end_run(rank, world, run.accelerator.wait_for_everyone, run.accelerator.end_training)  # torchrun aborts at exit without it
    return 0 if finished else 3


def setup_image_stage(cfg: TrainConfig, rank: int, world: int, local_rank: int) -> ImageRun:
    """Models, data and caches (each process its share, before any multi-process communication), then the
    accelerator, the trained module and its optimizer."""
    # 1. Models, and whether they fit together: before any data work or training.
    device, weight_dtype, out_dir, resume_from, base, llm, adapter = setup_run(cfg, rank, local_rank)
    template = getattr(adapter.config, "template", None)  # a published adapter has its own text side instead
    if cfg.model.attention_backend == "xformers":
        base.unet.enable_xformers_memory_efficient_attention()
    if cfg.gradient_checkpointing:
        base.unet.enable_gradient_checkpointing()
    lora_params = add_unet_lora(base.unet, cfg.lora.rank, cfg.lora.alpha, cfg.lora.target_modules) if cfg.lora.enabled else []
    loss_fn = DiffusionLoss(cfg.loss, base.alphas_cumprod).to(device)

    # 2. Data, and the latent cache in a step of its own (each process its share, no communication yet).
    dataset = scan_dataset(cfg.data.path, cfg.data.resolution, cfg.data.bucket_step, cfg.data.max_aspect, cfg.data.buckets,
                           cfg.data.name, cfg.data.image_column, cfg.data.caption_column)
    if any((w % base.vae_factor) or (h % base.vae_factor) for w, h in dataset.buckets):
        raise TrainConfigError(f"bucket sides {dataset.buckets} must be multiples of the VAE factor {base.vae_factor}")
    cache = None
    if cfg.data.cache_latents:
        cache, _ = cache_latents(cfg, dataset, base, rank, world, device)
    llm_states, captions = None, distinct_captions([s.caption for s in dataset.samples])
    if cfg.data.cache_llm_states:  # the same pre-step for the LLM's states: every world-th caption here
        llm_states = StateCache(Path(cfg.data.llm_cache_dir or out_dir / "llm_state_cache"), llm, template)
        llm_states.check_budget(captions, cfg.data.llm_cache_max_gb)
        llm_states.fill(captions[rank::world], cfg.batch_size)

    # 3. Multi-process communication starts here.
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    accelerator = Accelerator(mixed_precision=cfg.mixed_precision if device.type == "cuda" else "no",
                              cpu=device.type == "cpu", kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False)])
    accelerator.wait_for_everyone()
    keys = None
    if cache is not None:  # every entry is on disk now; encode locally whatever another node's disk holds
        keys, failed = fill(dataset, cache, base.encode_images, list(range(len(dataset.samples))), device)
        if failed:
            log.warning("skipped %d image(s) that failed to decode: %s", len(failed), "; ".join(failed[:20]))
            dataset = without(dataset, failed)
            keys, _ = fill(dataset, cache, base.encode_images, list(range(len(dataset.samples))), device)
    if llm_states is not None:  # as above: compute locally whatever another node's disk holds
        llm_states.fill(captions, cfg.batch_size)

    # 4. The trained module (adapter, UNet LoRA, learned loss weighting) and its optimizer.
    timer = PhaseTimer(device, cfg.time_phases)
    student = Student(adapter, base, llm, loss_fn, cfg, timer, template, llm_states)
    groups = [{"params": list(adapter.parameters()), "lr": cfg.optim.lr, "weight_decay": cfg.optim.weight_decay, "name": "adapter"}]
    if lora_params:
        groups.append({"params": lora_params, "lr": cfg.lora.lr, "weight_decay": 0.0, "name": "unet_lora"})
    if loss_fn.learned is not None:
        groups.append({"params": list(loss_fn.learned.parameters()), "lr": cfg.optim.learned_weighting_lr,
                       "weight_decay": 0.0, "name": "learned_weighting"})
    optimizer = torch.optim.AdamW(groups, betas=(cfg.optim.beta1, cfg.optim.beta2), eps=cfg.optim.eps)
    student, optimizer = accelerator.prepare(student, optimizer)
    raw = accelerator.unwrap_model(student)
    trainable = {n: p for n, p in raw.named_parameters() if p.requires_grad}
    ema = EMA(raw.adapter, cfg.ema_decay) if cfg.ema_decay > 0 else None
    return ImageRun(cfg, device, out_dir, resume_from, base, llm, dataset, cache, keys, accelerator, timer,
                    student, raw, optimizer, [g["lr"] for g in groups], trainable, ema)


def image_loop(run: ImageRun, progress: Progress, meter: RunLog) -> bool:
    """Train from `progress` up to max_steps, checkpointing on the way; False when debug.stop_after_step ended the
    run early (checkpoint written, as if the job were preempted)."""
    cfg, timer, raw, total = run.cfg, run.timer, run.raw, run.cfg.max_steps
    process, processes = run.accelerator.process_index, run.accelerator.num_processes
    order = BatchOrder(run.dataset.bucket_of, cfg.batch_size, cfg.seed, progress.epoch, process, processes)
    meter.start_clock()
    while progress.step < total:
        step, started = progress.step, (time.perf_counter(), time.process_time())
        with timer("data"):
            latents, sizes, captions, names = load_batch(run.dataset, order.next(progress), run.keys, run.cache, run.base,
                                                         run.device)
            gen = step_generator(cfg.seed, step, process)
            torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=gen)))  # adapter dropout, if any
            noise = torch.randn(latents.shape, generator=gen).to(run.device)
            timesteps = torch.randint(0, raw.loss_fn.data_weights.numel(), (latents.shape[0],), generator=gen).to(run.device)
            drop = (torch.rand(latents.shape[0], generator=gen) < cfg.data.caption_dropout).tolist()
            prompts = ["" if d else c for d, c in zip(drop, captions)]  # "" = the template's empty-prompt conditioning
        for group, base_lr in zip(run.optimizer.param_groups, run.base_lrs):
            group["lr"] = base_lr * lr_factor(step, total, cfg.optim.warmup_steps, cfg.optim.schedule)

        with nan_in_adapter_output(raw.adapter, step in cfg.debug.inject_nan_at_step):
            loss, logs = run.student(latents, noise, timesteps, prompts, sizes, step, total)
        with timer("student"):
            run.accelerator.backward(loss)
        with timer("optimizer"):
            finite, grad_norm, losses = optimizer_step(run.accelerator, loss, run.trainable, run.optimizer, run.ema,
                                                       raw.adapter, step, cfg.optim.grad_clip)
        if not finite:
            progress.nonfinite += 1
            per_sample = raw.loss_fn.last_per_sample
            bad = [n for n, v in zip(names, per_sample.tolist()) if not math.isfinite(v)] if per_sample is not None else []
            log.warning("step %d: non-finite loss/gradient, step skipped (%d of at most %d); samples with a non-finite "
                        "loss on rank %d: %s", step, progress.nonfinite, cfg.max_nonfinite_steps, process,
                        bad or "none here (another rank's batch)")
            if progress.nonfinite > cfg.max_nonfinite_steps:
                raise TrainingStopped(
                    f"stopping at step {step}: {progress.nonfinite} steps had a non-finite loss or gradient (limit "
                    f"max_nonfinite_steps={cfg.max_nonfinite_steps}). Lower optim.lr, prefer bf16 over fp16, or "
                    "check the samples named in the warnings above.")
        progress.step = step = step + 1

        if meter.step_done(step, started, losses, grad_norm, run.optimizer.param_groups[0]["lr"], logs, cfg.log_every):
            meter.write(step, {"it_per_s": 1 / max(meter.step_times[-1], 1e-9), **layer_weight_scalars(raw.adapter)})
        if run.is_main and cfg.validation.prompts and cfg.validation.every and step % cfg.validation.every == 0:
            run_validation(cfg, run.base, raw.adapter, run.llm, run.dataset, run.device, meter.writer, step)
        if step % cfg.checkpoint_every == 0 or step == total or step == cfg.debug.stop_after_step:
            save_checkpoint(run.accelerator, run.is_main, cfg, run.out_dir, progress, run.trainable, run.ema, run.optimizer,
                            raw.adapter)
        if step == cfg.debug.stop_after_step:
            log.warning("debug.stop_after_step=%d reached: exiting as if preempted", step)
            meter.bar.close()
            return False
    meter.bar.close()
    return True


def finish_image_stage(run: ImageRun, progress: Progress, meter: RunLog, started_from: Optional[dict]) -> None:
    """After the last step: the final validation images, then exactly the file the nodes load, plus the timing summary."""
    cfg = run.cfg
    if not meter.step_times and run.is_main:
        print(f"{run.resume_from} is already at max_steps={cfg.max_steps}: nothing to train, exporting", flush=True)
    run.accelerator.wait_for_everyone()
    if run.is_main:
        if cfg.validation.prompts and not (cfg.validation.every and progress.step % cfg.validation.every == 0):
            run_validation(cfg, run.base, run.raw.adapter, run.llm, run.dataset, run.device, meter.writer,
                           progress.step)  # the final images
        export(cfg, run.raw, run.ema, run.base, run.raw.frozen[1], run.dataset, progress.step, run.out_dir, started_from)
        write_timings(run.timer, meter, run.out_dir)
        meter.writer.close()
        if run.dataset.skipped:
            print(f"skipped {describe_skipped(run.dataset.skipped)}: " + "; ".join(run.dataset.skipped[:20]), flush=True)


def layer_weight_scalars(adapter: nn.Module) -> dict[str, float]:
    """The largest of the adapter's layer-fusion weights (a collapse onto one LLM layer shows here), when it fuses."""
    if getattr(adapter, "layer_logits", None) is None:
        return {}
    return {"adapter/layer_weight_max": float(torch.softmax(adapter.layer_logits.detach().float(), 0).max())}


def optimizer_step(accelerator, loss, trainable: dict, optimizer, ema: Optional[EMA], adapter: nn.Module, step: int,
                   grad_clip: float):
    """Clip, then step (and update the EMA) only if every rank's loss and the all-reduced gradient norm are finite;
    returns (finite, grad_norm, the losses of all ranks). Every rank must reach the same verdict, and a NaN loss can
    still give finite gradients (a NaN sample's slot may receive no gradient), hence both checks."""
    grad_norm = accelerator.clip_grad_norm_(list(trainable.values()), grad_clip or float("inf"))
    losses = accelerator.gather(loss.detach().float().reshape(1))
    finite = bool(torch.isfinite(losses).all()) and bool(torch.isfinite(grad_norm))
    if finite:
        optimizer.step()
        if ema is not None:
            ema.update(adapter, step)
    optimizer.zero_grad(set_to_none=True)
    return finite, grad_norm, losses


def save_checkpoint(accelerator, is_main: bool, cfg: TrainConfig, out_dir: Path, progress: Progress, trainable: dict,
                    ema: Optional[EMA], optimizer, adapter: nn.Module) -> None:
    """The counterpart of restore_checkpoint, written by the main process between two barriers (a collective)."""
    accelerator.wait_for_everyone()
    if is_main:
        state = {"step": progress.step, "data_epoch": progress.epoch, "data_position": progress.position,
                 "nonfinite_steps": progress.nonfinite, "config": cfg.to_dict(),
                 "adapter_config": adapter_config_dict(adapter.config)}
        ckpt.save(out_dir, progress.step, trainable, ema.shadow if ema else None, optimizer.state_dict(), state,
                  cfg.checkpoints_keep)
    accelerator.wait_for_everyone()


def restore_checkpoint(resume_from: Optional[Path], trainable: dict, ema: Optional[EMA], optimizer, device, is_main: bool,
                       max_steps: int) -> Progress:
    """Load a checkpoint into the trainable weights, EMA and optimizer; returns where it stood (a fresh Progress when
    there is nothing to resume)."""
    if resume_from is None:
        return Progress()
    saved = ckpt.load(resume_from)
    if set(saved["trainable"]) != set(trainable):
        raise ckpt.CheckpointError(
            f"{resume_from} holds other trainable weights than this run builds (missing "
            f"{sorted(set(trainable) - set(saved['trainable']))[:5]}, extra {sorted(set(saved['trainable']) - set(trainable))[:5]}): "
            "resume with the settings it was written with (its state.json has the config)")
    with torch.no_grad():
        for n, p in trainable.items():
            p.copy_(saved["trainable"][n].to(p.dtype))
    if ema is not None and saved["ema"] is not None:
        ema.shadow = {n: t.to(device) for n, t in saved["ema"].items()}
    optimizer.load_state_dict(saved["optimizer"])
    state = saved["state"]
    if is_main:
        print(f"resuming from {resume_from} at step {state['step']} of {max_steps}", flush=True)
    return Progress(state["step"], state["data_epoch"], state["data_position"], state["nonfinite_steps"])


def adapter_config_dict(config) -> dict:
    """The adapter's config for a checkpoint's state.json (a published adapter: its layout and sizes)."""
    if is_foreign(config) and config.layout == OURS_LAYOUT:  # rebuilt by adapter.file_format.build_module
        return to_adapter_config(config).to_dict()
    if is_foreign(config):
        return {"published": config.preset, "kind": config.kind, "layout": config.layout, "arch": config.arch.to_dict()}
    return config.to_dict()


def run_validation(cfg, base, adapter, llm, dataset, device, writer, step) -> None:
    adapter.eval()
    size = dataset.buckets[dataset.bucket_of[0]]
    images = validation_images(base, adapter, llm, cfg, size, device)
    adapter.train()
    folder = Path(cfg.output_dir) / "validation" / f"step-{step:08d}"
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        image.save(folder / f"{i:02d}.png")
        if writer is not None:
            import numpy as np

            writer.add_image(f"validation/{i:02d}", np.asarray(image), step, dataformats="HWC")


def export(cfg: TrainConfig, raw: nn.Module, ema: Optional[EMA], base: BaseModel, llm, dataset: Dataset, step: int,
           out_dir: Path, started_from: Optional[dict] = None) -> None:
    """<output_dir>/adapter.safetensors (EMA weights when EMA is on) with the run's provenance in its metadata:
    names, never the trainer machine's paths, since the file is meant to be shared. `raw` is the unwrapped module
    holding `.adapter` (the image stage's Student or the distill stage's Distiller)."""
    import copy

    adapter = copy.deepcopy(raw.adapter).eval()
    weights, kind = ckpt.adapter_weights(dict(raw.named_parameters()), ema.shadow if ema is not None else None)
    adapter.load_state_dict(weights, strict=True)
    lora_file = ""
    if cfg.lora.enabled:
        lora_file = "unet_lora.safetensors"
        tmp = out_dir / f".{lora_file}.tmp"
        export_comfy_lora(base.unet, cfg.lora.alpha, tmp, {"base_model": base.name, "steps": str(step)})
        os.replace(tmp, out_dir / lora_file)
    training = {
        "steps": step,
        "stage": cfg.stage,
        "loss": dataclasses.asdict(cfg.loss) if cfg.stage == "image" else dataclasses.asdict(cfg.distill),
        "dataset": dataset.name,
        "dataset_samples": len(dataset.samples),
        "base_model": base.name,
        "base_family": base.family,
        "prediction_type": base.prediction_type,
        "weights": kind,
        "ema_decay": cfg.ema_decay,
        "unet_lora": lora_file,
        "init_adapter": Path(cfg.model.init_adapter).name if cfg.model.init_adapter else "",
        "preset": (started_from or {}).get("preset", DEFAULT_PRESET),
        "config_file": (started_from or {}).get("config_file", ""),
        "resolved_config": shareable_dict(cfg),
    }
    if is_foreign(adapter.config) and (cfg.model.export_format == "ours" or adapter.config.layout == OURS_LAYOUT):
        # our format, which records the text model and text side it was trained with
        trained = dataclasses.replace(adapter.config, text=node_text_side(adapter.config, llm))  # the side encode_for ran
        path = save_adapter(out_dir / "adapter.safetensors", adapter, to_adapter_config(trained, llm.info, training))
    elif is_foreign(adapter.config):  # the key layout it came in, so the original packs and ours both load it
        path = save_foreign_adapter(out_dir / "adapter.safetensors", adapter, training, getattr(adapter, "file_dtype", None))
    else:
        config = dataclasses.replace(adapter.config, training=training)
        path = save_adapter(out_dir / "adapter.safetensors", adapter, config)
    print(f"adapter written: {path} ({'EMA' if kind == 'ema' else 'raw'} weights, {step} steps)"
          + (f"; UNet LoRA for ComfyUI's LoraLoader: {out_dir / lora_file}" if lora_file else ""), flush=True)


def write_timings(timer: PhaseTimer, meter: RunLog, out_dir: Path) -> None:
    """Print the per-phase summary and keep it as JSON (bench/trainer_overhead.py reads it)."""
    step_times, step_cpu_times, wall = meter.step_times, meter.step_cpu_times, time.perf_counter() - meter.start
    steps = len(step_times)
    phases = dict(timer.totals)
    import resource

    peak = {"cpu_max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if torch.cuda.is_available():
        peak["gpu_max_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
    summary = {"steps": steps, "wall_s": wall, "phases_s": phases, "step_times_s": step_times,
               "step_cpu_times_s": step_cpu_times, "peak_memory": peak}
    (out_dir / "timings.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    if steps:
        lines = [f"  {name:<10}{secs:9.2f} s  {1000 * secs / steps:9.1f} ms/step" for name, secs in sorted(phases.items())]
        other = sum(step_times) - sum(phases.values())
        lines.append(f"  {'other':<10}{other:9.2f} s  {1000 * other / steps:9.1f} ms/step")
        print(f"time per phase over {steps} steps:\n" + "\n".join(lines) + f"\npeak memory: {peak}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
