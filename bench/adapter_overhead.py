"""How much the adapter adds to prompt encoding: adapter forward time as a fraction of the LLM's.

The LLM is a randomly initialised model of Qwen2.5-0.5B's shape (hidden 896, 24 blocks, 14 heads,
2 KV heads, MLP 4864, vocabulary 151936), base model only (no LM head, as the nodes load it),
run through adapter.llm.run_llm exactly as in inference. The adapter is the default-size sd15 one.
Timing is batch 1, fp32, a fixed thread count, warm-up runs, then the median of repeats, for
16, 77 and 256-token prompts in one run. Goal: adapter < 10% of the LLM at 77 tokens.

    python -m bench.adapter_overhead               # the measurement (about 2 GB of RAM, a few minutes on 2 cores)
    python -m bench.adapter_overhead --quick       # smoke run: a 2-block LLM, one repeat (numbers meaningless)
    python -m bench.adapter_overhead --device cuda # on a GPU (synchronised timings)
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from adapter.config import TARGETS, AdapterConfig, ArchConfig, LLMInfo
from adapter.llm import run_llm
from adapter.model import LLMDiffAdapter

QWEN25_05B = dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                  intermediate_size=4864, vocab_size=151936, max_position_embeddings=32768, rope_theta=1e6,
                  rms_norm_eps=1e-6, tie_word_embeddings=True)
PROMPT_TOKENS = (16, 77, 256)
GOAL_TOKENS, GOAL_RATIO = 77, 0.10


def build_llm(layers: int, device: torch.device):
    """A random Qwen2Model of Qwen2.5-0.5B's shape (nothing downloaded)."""
    from transformers import Qwen2Config, Qwen2Model

    config = Qwen2Config(**{**QWEN25_05B, "num_hidden_layers": layers})
    config._attn_implementation = "sdpa"
    return Qwen2Model(config).to(device).eval().requires_grad_(False)


def median_ms_pair(first, second, device: torch.device, warmup: int, repeats: int) -> tuple[float, float]:
    """Median wall times (ms) of first() and second(), timed alternately after warm-up.

    Alternating spreads any background load over both sides, so their ratio stays fair on a
    shared machine. GPU work is synchronised before each clock read.
    """
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        first()
        second()
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for fn, bucket in ((first, times[0]), (second, times[1])):
            sync()
            start = time.perf_counter()
            fn()
            sync()
            bucket.append((time.perf_counter() - start) * 1000)
    return statistics.median(times[0]), statistics.median(times[1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 2-block LLM, 1 warm-up, 1 repeat")
    # One thread by default: on a shared machine, multi-threaded ops of this size wait for CPU time
    # far more than they compute, which swamps the timings. Pass --threads N on a quiet machine.
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mlp-ratio", type=float, default=ArchConfig().mlp_ratio,
                        help="adapter MLP ratio (default: ArchConfig's), to measure a lighter adapter")
    args = parser.parse_args(argv)
    if args.quick:
        args.warmup, args.repeats = 1, 1
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    layers = 2 if args.quick else QWEN25_05B["num_hidden_layers"]

    llm = build_llm(layers, device)
    config = AdapterConfig(llm=LLMInfo("Qwen2ForCausalLM", "qwen2", QWEN25_05B["hidden_size"], layers, "tokfp1:random"),
                           target=TARGETS["sd15"], arch=ArchConfig(mlp_ratio=args.mlp_ratio))
    adapter = LLMDiffAdapter(config).to(device).eval()
    print(f"LLM: random Qwen2.5-0.5B shape, {layers} blocks, {sum(p.numel() for p in llm.parameters()) / 1e6:.0f}M "
          f"parameters (no LM head); adapter: sd15, width {config.arch.width}, "
          f"{config.arch.refiner_layers}+{config.arch.resampler_layers} blocks, MLP x{config.arch.mlp_ratio:g}, "
          f"{adapter.num_parameters() / 1e6:.1f}M parameters")
    print(f"torch {torch.__version__}, device {device}, fp32, batch 1, {torch.get_num_threads()} threads, "
          f"{args.warmup} warm-up + median of {args.repeats}{'  [--quick: smoke run, not a measurement]' if args.quick else ''}\n")

    rows = []
    with torch.inference_mode():
        for tokens in PROMPT_TOKENS:
            ids = torch.randint(0, QWEN25_05B["vocab_size"], (1, tokens), device=device)
            mask = torch.ones(1, tokens, dtype=torch.long, device=device)
            states = run_llm(llm, ids, mask)
            llm_ms, adapter_ms = median_ms_pair(lambda: run_llm(llm, ids, mask), lambda: adapter(states, mask),
                                                device, args.warmup, args.repeats)
            rows.append((tokens, llm_ms, adapter_ms, adapter_ms / llm_ms))

    print("| prompt tokens | LLM forward (ms) | adapter forward (ms) | adapter / LLM |")
    print("|---:|---:|---:|---:|")
    for tokens, llm_ms, adapter_ms, ratio in rows:
        print(f"| {tokens} | {llm_ms:.1f} | {adapter_ms:.1f} | {ratio:.1%} |")
    ratio = dict((r[0], r[3]) for r in rows)[GOAL_TOKENS]
    verdict = "met" if ratio < GOAL_RATIO else "NOT met"
    if args.quick:
        verdict = "not judged (--quick is a smoke run of a 2-block LLM)"
    print(f"\ngoal: adapter < {GOAL_RATIO:.0%} of the LLM at {GOAL_TOKENS} tokens: {verdict} ({ratio:.1%})")


if __name__ == "__main__":
    main()
