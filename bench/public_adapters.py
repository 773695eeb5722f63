"""What the published adapters cost through this pack, on the CPU, in one run.

1. ELLA's per-step cost against an SD1.5 UNet call at 512 x 512 (a 64 x 64 latent), batch 2 (CFG's
   positive and negative): at every UNet call LLMDiffApplyAdapter's wrapper runs ELLA's whole
   resampler for both entries (adapter/timestep_contexts.py's StepContexts with the ELLA module; the T5
   states are projected once per prompt). Full-size, randomly initialised ELLA-SD1.5-TSC (768 wide,
   64 latents, 6 blocks, T5-XL's 2048-wide input, 128 T5 tokens) and SD1.5 UNet (diffusers'
   UNet2DConditionModel, 860M parameters, ELLA's 64 context tokens). FLOPs are counted with
   torch.utils.flop_counter.FlopCounterMode (matrix products and convolutions; bench.timestep_overhead's
   count_flops), CPU times are medians of alternating calls (bench.adapter_overhead.median_ms_pair).
   Goal: < 5% of the UNet call in FLOPs.
2. RouWei-Gemma's encode (Gemma + adapter) through LLMDiffTextEncode, in-process with ComfyUI's
   modules (CPU mode), with a random LLM of Gemma-3-1B's full shape (26 blocks, 262k vocabulary,
   bf16 on disk, fp32 in memory on a CPU) and a random full-size RouWei-Gemma v0.1 file: load time,
   the first encode (cold) and later encodes of new prompts (warm, our encode cache missed on purpose),
   and the process's peak resident memory. The tokenizer is the test suite's 1000-piece Gemma-style
   SentencePiece model (the real Gemma tokenizer is not available offline), so a prompt takes more
   tokens than with Gemma's real 262k vocabulary; the token counts are printed.

    .venv/bin/python -m bench.public_adapters            # ~10 GB RAM peak, several minutes on 2 cores
    .venv/bin/python -m bench.public_adapters --only ella
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GOAL_RATIO = 0.05
BATCH, LATENT, T5_TOKENS = 2, 64, 128
PROMPTS = ["a lighthouse on a cliff at night, waves, moonlight", "two cats sleeping on a red sofa, watercolor",
           "1girl, silver hair, reading a book in a sunlit library", "a bowl of ramen with a soft egg, close-up photo"]


def ella_rows(threads: int, warmup: int, repeats: int) -> list[str]:
    import torch

    from adapter.foreign import EllaAdapter, EllaConfig
    from adapter.timestep_contexts import StepStates
    from bench.adapter_overhead import median_ms_pair
    from bench.timestep_overhead import build_unet, count_flops, wrapper_step

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    unet = build_unet(False, torch.device("cpu"))
    ella = EllaAdapter(EllaConfig()).eval().requires_grad_(False)
    with torch.no_grad():
        for p in ella.parameters():  # random values: the cost does not depend on them
            p.normal_(0, 0.02)
    sample = torch.randn(BATCH, 4, LATENT, LATENT)
    context = torch.randn(BATCH, 64, 768)
    t = torch.tensor([700.0] * BATCH)
    entries = []
    with torch.no_grad():
        for _ in range(BATCH):  # the positive and the negative, 128 T5 tokens each (ELLA's padded length)
            states, mask = torch.randn(1, T5_TOKENS, 2048), torch.ones(1, T5_TOKENS, dtype=torch.long)
            encoded = ella.encode_states(states, mask)
            ctx = ella.decode(encoded, mask).context
            entries.append(StepStates.build(encoded, mask, T5_TOKENS, strength=1.0, context=ctx, num_tokens=64,
                                            adapter_id="bench", adapter_name="bench"))
        run_unet = lambda: unet(sample, t, encoder_hidden_states=context)  # noqa: E731
        run_step = lambda: wrapper_step(ella, entries, 700.0)  # noqa: E731
        run_encode = lambda: ella.encode_states(torch.randn(1, T5_TOKENS, 2048))  # noqa: E731
        unet_flops, step_flops, encode_flops = count_flops(run_unet), count_flops(run_step), count_flops(run_encode)
        unet_ms, step_ms = median_ms_pair(run_unet, run_step, torch.device("cpu"), warmup, repeats)
    params = sum(p.numel() for p in ella.parameters()) / 1e6
    return [
        f"ELLA-SD1.5-TSC shape ({params:.1f}M parameters) vs SD1.5 UNet ({sum(p.numel() for p in unet.parameters()) / 1e6:.0f}M), "
        f"latent {LATENT}x{LATENT} (512x512), batch {BATCH}, fp32, {threads} thread(s), median of {repeats}",
        "",
        "| per UNet call | GFLOPs | vs UNet (FLOPs) | CPU ms | vs UNet (time) |",
        "|---|---:|---:|---:|---:|",
        f"| SD1.5 UNet call | {unet_flops / 1e9:.1f} | 100% | {unet_ms:.0f} | 100% |",
        f"| ELLA per step (wrapper: 2 entries x {T5_TOKENS} T5 tokens) | {step_flops / 1e9:.2f} | {step_flops / unet_flops:.2%} | "
        f"{step_ms:.1f} | {step_ms / unet_ms:.2%} |",
        f"| (once per prompt) ELLA proj_in of {T5_TOKENS} T5 states | {encode_flops / 1e9:.3f} | - | - | - |",
        "",
        f"goal: ELLA per step < {GOAL_RATIO:.0%} of an SD1.5 UNet call in FLOPs: "
        f"{'met' if step_flops / unet_flops < GOAL_RATIO else 'NOT met'} ({step_flops / unet_flops:.2%})",
    ]


def _rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def rouwei_arm(threads: int) -> dict:
    """In this (sub)process: the pack loaded as ComfyUI loads it, the three nodes, timings and peak RSS."""
    import tempfile

    import torch

    sys.path.insert(0, str(REPO / "tests" / "unit"))
    from devkit.foreign_files import cached_public_adapters
    from devkit.tiny_encoders import make_gemma3_1b_width
    from devkit.comfy_pack import load_pack, node_classes, pack_module

    torch.set_num_threads(threads)
    llm_folder = make_gemma3_1b_width(layers=26, vocab_size=262144)
    adapter_file = cached_public_adapters()["rouwei-gemma-random.safetensors"]
    load_pack()
    import folder_paths

    root = Path(tempfile.mkdtemp(prefix="bench-rouwei-"))
    (root / "LLM").mkdir()
    (root / "llm_adapters").mkdir()
    (root / "LLM" / "gemma-3-1b-shape").symlink_to(llm_folder)
    (root / "llm_adapters" / "rouwei-gemma.safetensors").symlink_to(adapter_file)
    folder_paths.folder_names_and_paths["LLM"] = ([str(root / "LLM")], {"folder"})
    folder_paths.folder_names_and_paths["llm_adapters"] = ([str(root / "llm_adapters")], {".safetensors"})
    nodes = node_classes()
    base = _rss_mb("VmRSS")
    start = time.perf_counter()
    llm = nodes["LLMDiffLoadLLM"].execute("gemma-3-1b-shape", "auto").args[0]
    adapter, info = nodes["LLMDiffLoadAdapter"].execute("rouwei-gemma.safetensors").args
    load_s = time.perf_counter() - start
    times, tokens = [], []
    for prompt in PROMPTS:  # new prompts: the encode cache never serves them
        start = time.perf_counter()
        _, text = nodes["LLMDiffTextEncode"].execute(llm, adapter, prompt).args
        times.append(time.perf_counter() - start)
        tokens.append(int(text.split("prompt: ")[1].split(" of")[0]))
    pack_module("nodes.encode").ENCODE_CACHE.clear()
    return {"load_s": load_s, "cold_s": times[0], "warm_s": statistics.median(times[1:]), "warm_all_s": times[1:],
            "tokens": tokens, "base_mb": base, "peak_mb": _rss_mb("VmHWM"), "threads": threads,
            "llm_params_m": sum(p.numel() for p in llm.loaded.model.parameters()) / 1e6,
            "adapter_params_m": sum(p.numel() for p in adapter.module.parameters()) / 1e6, "info": info}


def rouwei_rows(threads: int) -> list[str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests")]), HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1")
    cmd = [sys.executable, "-m", "bench.public_adapters", "--rouwei-arm", "--threads", str(threads)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"the RouWei arm failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    return [
        f"RouWei-Gemma through LLMDiffTextEncode: random Gemma-3-1B shape ({r['llm_params_m']:.0f}M parameters, fp32 on the CPU) "
        f"+ random full-size RouWei-Gemma v0.1 ({r['adapter_params_m']:.0f}M), {r['threads']} thread(s)",
        f"loader info: {r['info']}",
        "",
        "| step | seconds |",
        "|---|---:|",
        f"| load (Load LLM + Load LLM Diff Adapter) | {r['load_s']:.1f} |",
        f"| first encode (cold), {r['tokens'][0]} tokens after skip_first | {r['cold_s']:.2f} |",
        f"| later encodes (warm, new prompts), median of {len(r['warm_all_s'])}, {r['tokens'][1:]} tokens | {r['warm_s']:.2f} |",
        "",
        f"process RSS: {r['base_mb'] / 1024:.2f} GiB after imports, peak {r['peak_mb'] / 1024:.2f} GiB",
    ]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=["ella", "rouwei"], help="run one part")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rouwei-arm", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rouwei_arm:
        print(json.dumps(rouwei_arm(args.threads)))
        return 0
    lines = []
    if args.only in (None, "ella"):
        lines += ella_rows(args.threads, args.warmup, args.repeats) + [""]
    if args.only in (None, "rouwei"):
        lines += rouwei_rows(args.threads)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
