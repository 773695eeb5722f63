"""Load time, peak memory and encode time of a full-size LLM through the transformers path and ComfyUI's.

A random model of Qwen2.5-3B's shape (devkit/full_llm.py: 3.09 B parameters,
a 6.2 GB bf16 single file and a Hugging Face folder over the same file), loaded and run on the CPU the
way the two LLM loaders do it:

    transformers       Load LLM on a Hugging Face folder, dtype auto (fp32 on a CPU): adapter.load_llm
    comfyui            CLIPLoader + LLM from CLIP loader (or Load LLM on the single file): comfy.sd.load_clip,
                       ComfyUI keeps the file's bf16 weights and computes in fp32 (comfy.ops casts per layer)
    transformers-bf16  (with --arms) Load LLM with dtype bf16: the same storage as comfyui, computing in bf16

Each arm runs in a fresh subprocess, so its peak resident memory (VmHWM, /proc/self/status: everything
the process touched, mmapped file pages included) is its own; a sampler thread also records the peaks of
RssAnon (memory allocated) and RssFile (pages of the weight file mapped while loading, which the kernel
can drop and re-read) separately; "base" is the RSS after imports, before loading. Load time covers reading the weights up to a model ready to run (the tokenizer and fingerprint
included). Encode time is the median over PROMPTS of one `adapter.encode_prompts` call (template,
tokenizer, every block's states), after one warm-up prompt, with ComfyUI's model management asked to
load the model first (a no-op on a CPU, as in the node). The states of the first prompt are compared
across arms (max |a - b| / max |b| over the [1, L+1, T, H] tensor): the full-size parity check.

Ratios: peak / file size (the bf16 weights, 6.2 GB), peak / the weights as the arm holds them in memory,
and every time or peak / the transformers arm's. Goal: peak under 1.3x the weights; the
ComfyUI path no slower than transformers.

    .venv/bin/python -m bench.comfy_llm_paths          # ~13 GB free RAM needed; ~15 min on 2 cores
    .venv/bin/python -m bench.comfy_llm_paths --arms transformers,comfyui,transformers-bf16

Builds the random weights on first use (about 4 minutes, cached). Writes a Markdown table to stdout
and, with --out, to a file.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ARMS = ("transformers", "comfyui", "transformers-bf16")
DEFAULT_ARMS = "transformers,comfyui"
PROMPTS = (
    "a red fox sitting in the snow at golden hour, detailed photograph",
    "an oil painting of a lighthouse on a cliff during a storm, dramatic clouds",
    "a bowl of ramen with a soft-boiled egg, steam rising, top view",
    "a futuristic city at night, neon signs reflected in the rain on the street",
)
REPO = Path(__file__).resolve().parents[1]


def _rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


class RssSampler:
    """Highest RssAnon (memory the process allocated) and RssFile (mapped file pages it touched, which the
    kernel can drop and re-read under pressure) seen every 20 ms: VmHWM is only their highest sum."""

    def __init__(self):
        import threading

        self.peak_anon = self.peak_file = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.wait(0.02):
            self.peak_anon = max(self.peak_anon, _rss_mb("RssAnon"))
            self.peak_file = max(self.peak_file, _rss_mb("RssFile"))

    def stop(self):
        self._stop.set()
        self._thread.join()


def run_arm(arm: str, states_out: Path) -> dict:
    """One arm in this process: load, encode, report (called in the subprocess)."""
    import torch

    from devkit.full_llm import build_qwen25_3b

    weights = build_qwen25_3b()
    if arm == "comfyui":
        from devkit.comfy_pack import load_pack, pack_module  # imports ComfyUI in CPU mode and the pack, as ComfyUI does

        load_pack()
        lib, comfy_llm = pack_module("adapter"), pack_module("nodes.comfy_llm")
    else:
        import adapter as lib

    base = _rss_mb("VmRSS")
    sampler = RssSampler()
    start = time.perf_counter()
    if arm == "comfyui":
        import comfy.model_management as mm
        import comfy.sd

        clip = comfy.sd.load_clip(ckpt_paths=[str(weights.file)], clip_type=comfy.sd.CLIPType.OMNIGEN2)  # CLIPLoader
        llm = comfy_llm.handle_from_clip(clip, None, identity="bench").loaded
        load_model = lambda: mm.load_models_gpu([clip.patcher])  # noqa: E731  (what the encode path asks first)
    else:
        dtype = torch.bfloat16 if arm == "transformers-bf16" else torch.float32
        llm = lib.load_llm(weights.folder, dtype=dtype)
        load_model = lambda: None  # noqa: E731
    load_s = time.perf_counter() - start
    after_load = _rss_mb("VmHWM")
    template = lib.record_chat_template(lib.TemplateConfig(), llm.tokenizer)
    times = []
    with torch.no_grad():
        for index, prompt in enumerate(("a warm-up prompt",) + PROMPTS):
            start = time.perf_counter()
            load_model()
            encoded = lib.encode_prompts(llm, template, [prompt])
            if index:
                times.append(time.perf_counter() - start)
            if index == 1:
                torch.save(encoded.hidden_states.float().contiguous(), states_out)  # our own file, read back by the parent
    sampler.stop()
    weight_bytes = sum(p.numel() * p.element_size() for p in llm.model.parameters())
    return {
        "arm": arm, "load_s": load_s, "encode_s": statistics.median(times), "encode_all_s": times,
        "tokens": int(encoded.attention_mask.sum()), "base_mb": base, "peak_after_load_mb": after_load,
        "peak_mb": _rss_mb("VmHWM"), "peak_anon_mb": sampler.peak_anon, "peak_file_mb": sampler.peak_file,
        "weights_in_memory_mb": weight_bytes / 2**20,
        "file_mb": weights.size_bytes / 2**20, "threads": torch.get_num_threads(),
    }


def run_subprocess(arm: str, states_out: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1")
    cmd = [sys.executable, "-m", "bench.comfy_llm_paths", "--one-arm", arm, "--states", str(states_out)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"arm {arm} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def relative_difference(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


def table(results: list[dict], differences: dict[str, float]) -> str:
    base = next((r for r in results if r["arm"] == "transformers"), results[0])
    gib = lambda mb: mb / 1024  # noqa: E731
    lines = [
        f"Random Qwen2.5-3B ({base['file_mb'] / 1024:.2f} GiB bf16 file), CPU, {base['threads']} threads, "
        f"{base['tokens']}-token prompts (template included); encode = median of {len(PROMPTS)} prompts.",
        "",
        "| path | load (s) | vs transformers | peak RSS (GiB) | peak / file | peak / weights in memory | vs transformers "
        "| encode (s) | vs transformers | states vs transformers |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        difference = "-" if r["arm"] == base["arm"] else f"{differences[r['arm']]:.1e}"
        lines.append(
            f"| {r['arm']} | {r['load_s']:.1f} | {r['load_s'] / base['load_s']:.2f}x | {gib(r['peak_mb']):.2f} "
            f"| {r['peak_mb'] / r['file_mb']:.2f}x | {r['peak_mb'] / r['weights_in_memory_mb']:.2f}x "
            f"({gib(r['weights_in_memory_mb']):.1f} GiB) | {r['peak_mb'] / base['peak_mb']:.2f}x "
            f"| {r['encode_s']:.2f} | {r['encode_s'] / base['encode_s']:.2f}x "
            f"| {difference} |"
        )
    lines += ["", "Peak RSS split (sampled every 20 ms; GiB): "
              + "; ".join(f"{r['arm']} allocated {gib(r['peak_anon_mb']):.2f} ({r['peak_anon_mb'] / r['weights_in_memory_mb']:.2f}x "
                          f"weights), mapped file pages {gib(r['peak_file_mb']):.2f}" for r in results),
              "RSS after imports, before loading (GiB): " + ", ".join(f"{r['arm']} {gib(r['base_mb']):.2f}" for r in results),
              "Encode times (s, each prompt): " + "; ".join(f"{r['arm']} " + ", ".join(f"{t:.1f}" for t in r["encode_all_s"])
                                                          for r in results)]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arms", default=DEFAULT_ARMS, help=f"comma-separated, of {', '.join(ARMS)} (default {DEFAULT_ARMS})")
    parser.add_argument("--out", type=Path, help="also write the table here")
    parser.add_argument("--one-arm", choices=ARMS, help=argparse.SUPPRESS)  # internal: run one arm, print JSON
    parser.add_argument("--states", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one_arm:
        print(json.dumps(run_arm(args.one_arm, args.states)))
        return 0
    import torch

    from devkit.full_llm import build_qwen25_3b

    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = sorted(set(arms) - set(ARMS))
    if unknown:
        parser.error(f"unknown arm(s) {', '.join(unknown)}; choose from {', '.join(ARMS)}")
    build_qwen25_3b()  # once, before any timing
    results, states = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for arm in arms:
            print(f"running {arm} ...", file=sys.stderr, flush=True)
            results.append(run_subprocess(arm, Path(tmp) / f"{arm}.pt"))
            states[arm] = torch.load(Path(tmp) / f"{arm}.pt", weights_only=True)
    reference = states.get("transformers", states[arms[0]])
    differences = {arm: relative_difference(s, reference) for arm, s in states.items()}
    text = table(results, differences)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
