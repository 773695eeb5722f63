"""How much time does the trainer add on top of the work a step cannot avoid?

    python bench/trainer_overhead.py [--steps 12] [--batch-size 4] [--resolution 64] [--out bench_out]

1. Runs the real trainer (`python -m training.train`) twice on the same small-but-not-trivial models, with the
   teacher active on every step (loss.teacher_schedule=constant), with and without the latent cache, and
   reads the per-phase times, step times and peak memory it writes to <output-dir>/timings.json.
   Everything runs on one thread and is compared in CPU time (time.process_time), which other load on a
   shared machine barely moves; wall times are printed beside it.
2. Times the step's unavoidable parts here, with plain diffusers / transformers / torch calls (none of the
   trainer's functions), on the same models, batch and prompts:
     LLM forward        AutoModel(...)(input_ids, output_hidden_states=True) under no_grad
     teacher forward    CLIPTextModel + UNet2DConditionModel forward under no_grad
     student fwd+bwd    adapter forward + UNet forward + MSE backward (the trained path)
     optimizer          AdamW step over the adapter's parameters
3. Prints a table: trainer ms/step (median after warm-up) vs the sum of the parts, and the overhead.

Models: a 24M-parameter SD1.5-shaped UNet (devkit/tiny_pipelines.py "sd15-bench"), the tiny Qwen2
of devkit/tiny_models.py, a 2+2-layer adapter of width 256. Everything is built locally and cached.
"""
from __future__ import annotations

import argparse
import os
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO)]  # the adapter package and devkit's model builders, also when run as a file

import torch  # noqa: E402

ARCH = ["--set", "arch.width=256", "--set", "arch.heads=4", "--set", "arch.refiner_layers=2",
        "--set", "arch.resampler_layers=2", "--set", "template.max_tokens=48"]


def run_trainer(pipeline: Path, llm: Path, data: Path, out: Path, steps: int, batch: int, resolution: int,
                cache: bool) -> dict:
    cmd = [sys.executable, "-m", "training.train", "--base-model", str(pipeline), "--llm", str(llm), "--data", str(data),
           "--output-dir", str(out), "--max-steps", str(steps), "--batch-size", str(batch), "--resolution", str(resolution),
           "--checkpoint-every", str(10 * steps), "--set", "data.bucket_step=16", "--set", "data.caption_dropout=0.0",
           "--set", "loss.teacher_schedule=constant", "--set", f"data.cache_latents={'true' if cache else 'false'}",
           "--set", "log_every=1000", *ARCH]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")  # one thread: CPU time then measures work
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"trainer failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads((out / "timings.json").read_text())


def timed(fn, repeats: int, warmup: int = 2) -> float:
    """Median CPU seconds of fn() after warm-up (one thread, so CPU time is the work, whatever else runs)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.process_time()
        fn()
        times.append(time.process_time() - start)
    return statistics.median(times)


def measure_parts(pipeline: Path, llm_dir: Path, prompts: list[str], batch: int, resolution: int, repeats: int) -> dict:
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import AutoModel, AutoTokenizer, CLIPTextModel, CLIPTokenizer

    from adapter import AdapterConfig, ArchConfig, LLMDiffAdapter, TemplateConfig, make_target, tokenize_prompts
    from adapter.llm import load_llm

    unet = UNet2DConditionModel.from_pretrained(str(pipeline / "unet")).requires_grad_(False).eval()
    clip = CLIPTextModel.from_pretrained(str(pipeline / "text_encoder")).requires_grad_(False).eval()
    clip_tok = CLIPTokenizer.from_pretrained(str(pipeline / "tokenizer"))
    scheduler = DDPMScheduler.from_pretrained(str(pipeline / "scheduler"))
    llm = AutoModel.from_pretrained(str(llm_dir)).requires_grad_(False).eval()
    llm_tok = AutoTokenizer.from_pretrained(str(llm_dir))
    info = load_llm(llm_dir).info  # only for the adapter's config (sizes + tokenizer fingerprint)
    template = TemplateConfig(max_tokens=48)
    adapter = LLMDiffAdapter(AdapterConfig(llm=info, target=make_target("sd15", context_dim=unet.config.cross_attention_dim),
                                           template=template, arch=ArchConfig(width=256, heads=4, refiner_layers=2, resampler_layers=2)))
    optimizer = torch.optim.AdamW(adapter.parameters(), lr=1e-4)

    prompts = (prompts * batch)[:batch]
    tokens = tokenize_prompts(llm_tok, template, prompts)  # the template is the adapter's input format, not trainer code
    clip_ids = clip_tok(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    side = resolution // 2  # the VAE halves the image
    latents = torch.randn(batch, 4, side, side)
    noise = torch.randn_like(latents)
    t = torch.randint(0, 1000, (batch,))
    x_t = scheduler.add_noise(latents, noise, t)

    with torch.no_grad():
        hidden = torch.stack(llm(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask,
                                 output_hidden_states=True).hidden_states, 1)

    def llm_forward():
        with torch.no_grad():
            llm(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask, output_hidden_states=True)

    def teacher_forward():
        with torch.no_grad():
            context = clip(clip_ids).last_hidden_state
            unet(x_t, t, encoder_hidden_states=context)

    def student_forward_backward():
        context = adapter(hidden, tokens.attention_mask).context
        pred = unet(x_t, t, encoder_hidden_states=context).sample
        torch.nn.functional.mse_loss(pred, noise).backward()

    def optimizer_step():
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)

    student_forward_backward()  # so the optimizer has gradients to apply
    return {
        "llm": timed(llm_forward, repeats),
        "teacher": timed(teacher_forward, repeats),
        "student": timed(student_forward_backward, repeats),
        "optimizer": timed(optimizer_step, repeats),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "bench_trainer_overhead")
    args = parser.parse_args()
    torch.set_num_threads(1)

    from devkit.tiny_models import make_tiny_llm
    from devkit.tiny_pipelines import tiny_pipeline
    from devkit.train_runs import tiny_dataset

    import shutil

    shutil.rmtree(args.out, ignore_errors=True)
    pipeline, llm = tiny_pipeline("sd15-bench"), make_tiny_llm(family="qwen2")
    data = tiny_dataset(args.out / "data", count=2 * args.batch_size)
    for image in data.glob("*.png"):  # one square bucket: every batch has the same shape
        from PIL import Image

        Image.open(image).convert("RGB").resize((args.resolution, args.resolution)).save(image)
    prompts = [p.read_text() for p in sorted(data.glob("*.txt"))]

    runs = {cache: run_trainer(pipeline, llm, data, args.out / f"cache-{cache}", args.steps, args.batch_size,
                               args.resolution, cache) for cache in (True, False)}
    parts = measure_parts(pipeline, llm, prompts, args.batch_size, args.resolution, repeats=max(5, args.steps - 2))
    floor = parts["llm"] + parts["teacher"] + parts["student"]

    print(f"\nbatch {args.batch_size} x {args.resolution}px, {args.steps} steps, one thread, CPU ms (median after warm-up)")
    print("unavoidable parts (plain diffusers/transformers calls):")
    for name, secs in parts.items():
        print(f"  {name:<22}{1000 * secs:9.1f} ms")
    print(f"  {'sum llm+teacher+student':<22}{1000 * floor:9.1f} ms   (+ optimizer: {1000 * (floor + parts['optimizer']):.1f} ms)")
    print("\ntrainer (python -m training.train):   latent cache on | off")
    for cache in (True, False):
        run = runs[cache]
        warm = run["step_cpu_times_s"][2:] or run["step_cpu_times_s"]
        step = statistics.median(warm)
        wall = statistics.median(run["step_times_s"][2:] or run["step_times_s"])
        phases = {k: 1000 * v / run["steps"] for k, v in sorted(run["phases_s"].items())}
        print(f"  cache={'on ' if cache else 'off'} step {1000 * step:8.1f} ms (wall {1000 * wall:.0f})  overhead vs parts {100 * (step / floor - 1):+6.1f}%"
              f"  (vs parts+optimizer {100 * (step / (floor + parts['optimizer']) - 1):+6.1f}%)  peak RSS "
              f"{run['peak_memory']['cpu_max_rss_mb']:.0f} MB")
        print("      per phase (mean wall ms/step): " + ", ".join(f"{k} {v:.1f}" for k, v in phases.items()))


if __name__ == "__main__":
    main()
