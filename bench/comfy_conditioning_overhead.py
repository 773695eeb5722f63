"""What our conditioning costs inside a real ComfyUI run: LLM Diff Text Encode vs CLIPTextEncode.

One SD1.5 txt2img graph through a real ComfyUI 0.3.75 server (the e2e
harness, devkit/comfyui.py), 256x256 (a 32x32 latent), batch 1, KSampler euler/normal,
10 steps, CFG 7 with a CLIP-encoded empty negative, VAE decode and save. Two arms differ only in
the positive:

    clip  CLIPTextEncode(prompt)                                      (CLIP-L)
    ours  LLMDiffTextEncode(Load LLM, Load LLM Diff Adapter, prompt)  (tiny Qwen2 + sd15 adapter)

Every run uses a new prompt, so neither ComfyUI's node cache nor our encode cache serves it: each
run really encodes. Both arms are warmed up first (models loaded: the LLM is already in memory, as
in a session where only the prompt changes), then timed alternately so background load on a shared
machine falls on both. Same seed throughout.

Time per run is ComfyUI's own: the `execution_start` -> `execution_success` timestamps (ms) in the
prompt's /history status messages, i.e. the server's execution of the graph without HTTP polling.
The client-side wall time (POST /prompt to the history entry) is reported beside it.

The adapter keeps 77 tokens, so ComfyUI batches our positive with CLIP's 77-token negative in one
UNet call (comfy/conds.py, CONDCrossAttn.can_concat). An adapter whose token count cannot be
batched doubles the UNet calls and would show here as a ratio near 2. Goal: ratio < 1.05.

Weights are random (built once by devkit/weights.py into the cache); the LLM is the test
suite's tiny Qwen2 with the real Qwen2.5 tokenizer, so the LLM's own cost is far below a real
1.5B model's: this measures the pipeline overhead (tokenising, every-layer states, the adapter,
conditioning plumbing, batching with the negative), not a production LLM's forward.

    .venv/bin/python -m bench.comfy_conditioning_overhead             # ~5 min on 2 cores
    .venv/bin/python -m bench.comfy_conditioning_overhead --repeats 2 # quicker, noisier

Writes the Markdown table to stdout and, with --out, to a file.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

GOAL = 1.05
SEED = 42
STEPS = 10
SIZE = 256
UNET, VAE, CLIP = "sd15_unet_random.safetensors", "sd_vae_random.safetensors", "clip_l_random.safetensors"
LLM, ADAPTER = "tiny-qwen2", "tiny-qwen2-sd15.safetensors"
PROMPTS = [
    "a red cube on a wooden table", "a lighthouse on a cliff at night", "two cats sleeping on a sofa",
    "a bowl of ramen with a soft egg", "an old map of a harbour town", "a green bicycle leaning on a wall",
    "snow falling over a pine forest", "a glass teapot on a windowsill", "a fox running through tall grass",
    "a neon sign in the rain", "a sailboat on a calm lake", "a stack of books beside a candle",
]


def graph(arm: str, prompt: str) -> dict:
    """The API prompt for one run of `arm` ("clip" or "ours"); everything but the positive is shared."""
    g = {
        "unet": {"class_type": "UNETLoader", "inputs": {"unet_name": UNET, "weight_dtype": "default"}},
        "vae": {"class_type": "VAELoader", "inputs": {"vae_name": VAE}},
        "clip": {"class_type": "CLIPLoader", "inputs": {"clip_name": CLIP, "type": "stable_diffusion", "device": "default"}},
        "negative": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["clip", 0]}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": SIZE, "height": SIZE, "batch_size": 1}},
        "sampler": {"class_type": "KSampler", "inputs": {
            "model": ["unet", 0], "positive": ["positive", 0], "negative": ["negative", 0], "latent_image": ["latent", 0],
            "seed": SEED, "steps": STEPS, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "decode": {"class_type": "VAEDecode", "inputs": {"samples": ["sampler", 0], "vae": ["vae", 0]}},
        "save": {"class_type": "SaveImage", "inputs": {"images": ["decode", 0], "filename_prefix": f"bench_{arm}"}},
    }
    if arm == "clip":
        g["positive"] = {"class_type": "CLIPTextEncode", "inputs": {"text": prompt, "clip": ["clip", 0]}}
    else:
        g["llm"] = {"class_type": "LLMDiffLoadLLM", "inputs": {"llm_name": LLM, "dtype": "auto"}}
        g["adapter"] = {"class_type": "LLMDiffLoadAdapter", "inputs": {"adapter_name": ADAPTER}}
        g["positive"] = {"class_type": "LLMDiffTextEncode", "inputs": {"llm": ["llm", 0], "adapter": ["adapter", 0], "text": prompt}}
    return g


def execution_seconds(result) -> float:
    """Server-side time of one prompt: execution_start -> execution_success timestamps in its history."""
    stamps = {kind: data["timestamp"] for kind, data in result.history["status"]["messages"]}
    return (stamps["execution_success"] - stamps["execution_start"]) / 1000


@dataclass
class Arm:
    server_s: list[float] = field(default_factory=list)
    client_s: list[float] = field(default_factory=list)


def make_adapter(llm_dir: Path, out: Path) -> Path:
    """A fresh (untrained) sd15 adapter for the tiny LLM, made by the real CLI."""
    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "adapter", "init", "--llm", str(llm_dir), "--target", "sd15", "--out", str(out)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"`python -m adapter init` failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return out


def measure(server, repeats: int) -> dict[str, Arm]:
    """Warm up both arms, then time them alternately, a new prompt every run."""
    arms = {"clip": Arm(), "ours": Arm()}
    prompts = iter(f"{PROMPTS[i % len(PROMPTS)]}, variation {i}" for i in range(10_000))
    order = ("clip", "ours")
    for arm in order:  # warm-up: loads the UNet, VAE, CLIP, LLM and adapter; not timed
        result = server.run(graph(arm, next(prompts)), timeout=600)
        if not result.ok:
            raise SystemExit(f"warm-up run of {arm!r} failed: {result.error_text}\n{server.log_tail()}")
    for i in range(repeats):
        for arm in order if i % 2 == 0 else order[::-1]:  # alternate which arm goes first
            result = server.run(graph(arm, next(prompts)), timeout=600)
            if not result.ok:
                raise SystemExit(f"run {i} of {arm!r} failed: {result.error_text}")
            if "positive" in result.cached_nodes:
                raise SystemExit("the positive encode was served from ComfyUI's cache: the run proves nothing")
            arms[arm].server_s.append(execution_seconds(result))
            arms[arm].client_s.append(result.seconds)
            print(f"  repeat {i + 1}/{repeats} {arm:4s}: {arms[arm].server_s[-1]:.2f} s (server), "
                  f"{result.seconds:.2f} s (client)", file=sys.stderr, flush=True)
    return arms


def table(arms: dict[str, Arm], repeats: int) -> str:
    """Markdown table of per-arm medians and the per-repeat ratio ours / clip (median, min, max)."""
    lines = [
        f"SD1.5 random weights, {SIZE}x{SIZE} (32x32 latent), batch 1, {STEPS} steps euler, CFG 7 with a CLIP-encoded "
        f"empty negative, seed {SEED}; {repeats} alternating repeats per arm after one warm-up each; a new prompt every run.",
        "",
        "| timing | CLIP positive, median s | LLM Diff positive, median s | ratio ours/CLIP, median | ratio min - max |",
        "|---|---|---|---|---|",
    ]
    for label, attr in (("server (execution_start -> execution_success)", "server_s"), ("client (POST /prompt -> /history)", "client_s")):
        clip, ours = getattr(arms["clip"], attr), getattr(arms["ours"], attr)
        ratios = [o / c for o, c in zip(ours, clip)]
        lines.append(f"| {label} | {statistics.median(clip):.2f} | {statistics.median(ours):.2f} | "
                     f"{statistics.median(ratios):.3f} | {min(ratios):.3f} - {max(ratios):.3f} |")
    ratio = statistics.median(o / c for o, c in zip(arms["ours"].server_s, arms["clip"].server_s))
    lines += ["", f"Goal: median server-side ratio < {GOAL}: {'met' if ratio < GOAL else 'NOT met'} ({ratio:.3f})."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--repeats", type=int, default=6, help="timed runs per arm (after one warm-up each)")
    parser.add_argument("--out", type=Path, help="also write the Markdown table here")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")

    try:  # the e2e harness: server, random weights, tiny LLM (devkit/)
        from devkit import weights
        from devkit.comfyui import ComfyServer
        from devkit.tiny_models import make_tiny_llm
    except ModuleNotFoundError as err:
        parser.error(f"{err}: run from the repository root (the benchmark uses devkit/, the test harness)")

    sd15 = weights.build_sd15()
    llm_dir = make_tiny_llm(family="qwen2")
    with tempfile.TemporaryDirectory(prefix="llmdiff-bench-") as tmp:
        adapter = make_adapter(llm_dir, Path(tmp) / ADAPTER)
        server = ComfyServer("bench-conditioning")
        try:  # models are linked before start so the loaders' dropdowns list them from the first request
            server.link_model("unet", sd15.unet, UNET)
            server.link_model("vae", sd15.vae, VAE)
            server.link_model("clip", sd15.clip_l, CLIP)
            server.link_model("LLM", llm_dir, LLM)
            server.link_model("llm_adapters", adapter, ADAPTER)
            server.start()
            arms = measure(server, args.repeats)
        finally:
            server.stop()
    report = table(arms, args.repeats)
    print(report)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
