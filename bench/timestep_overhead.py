"""What exact timestep-aware conditioning adds per sampler step: the adapter's `decode` vs an SD1.5 UNet call.

The ComfyUI wrapper (LLMDiffApplyAdapter, issue 6) caches `encode_states` per conditioning entry and
runs `decode` (timestep MLP + adaLN-modulated resampler + context head) at every UNet call, for the
whole batch that call carries (cond and uncond of CFG: batch 2). This script measures that added cost
against one call of a full-size, randomly initialised SD1.5 UNet (diffusers' UNet2DConditionModel
with cross_attention_dim 768, 860M parameters) at a 32x32 latent (256x256 pixels), batch 2, 77
context tokens, in one run:

- FLOPs, counted with torch.utils.flop_counter.FlopCounterMode (hardware-independent). It counts
  matrix products and convolutions (2 FLOPs per multiply-add), not element-wise work; attention is
  run through the math SDPA backend while counting so its matrix products are counted on any device.
- Wall time on this machine: alternating calls, warm-up, median (bench.adapter_overhead.median_ms_pair).

Rows: `decode` at 77 and 256 prompt tokens (the refined tokens the resampler reads), with the default
ArchConfig.timestep_blocks (the last resampler block modulated) and with every block modulated, and
for reference the whole adapter forward (what a wrapper without the encode/decode split would pay).
Goal (issue 6): decode < 1% of the UNet step in FLOPs. The UNet's FLOPs grow with the latent size,
so 32x32 is the least favourable of the usual sizes for this ratio.

    python -m bench.timestep_overhead                 # about 3.5 GB of RAM, a minute or two on 2 cores
    python -m bench.timestep_overhead --quick         # smoke run: a 2-level UNet, 1 repeat (ratio not judged)
    python -m bench.timestep_overhead --device cuda   # on a GPU (synchronised timings)
"""
from __future__ import annotations

import argparse

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from adapter.config import TARGETS, AdapterConfig, ArchConfig, LLMInfo
from adapter.model import LLMDiffAdapter
from bench.adapter_overhead import QWEN25_05B, median_ms_pair

BATCH, LATENT, CONTEXT_TOKENS = 2, 32, 77
PROMPT_TOKENS = (77, 256)
LLM_LAYERS = 24  # Qwen2.5-0.5B's shape; only the adapter's input side (not decode) depends on it
GOAL_RATIO = 0.01


def build_unet(quick: bool, device: torch.device):
    """A random SD1.5 UNet (diffusers' defaults are SD1.5's layout); --quick: two levels, one layer each."""
    from diffusers import UNet2DConditionModel

    kw = dict(cross_attention_dim=768, sample_size=LATENT, attention_head_dim=8)
    if quick:
        kw.update(block_out_channels=(32, 64), layers_per_block=1,
                  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=4)
    return UNet2DConditionModel(**kw).to(device).eval().requires_grad_(False)


def count_flops(fn) -> int:
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: a tiny UNet, 1 warm-up, 1 repeat")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: fair on a shared machine)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.quick:
        args.warmup, args.repeats = 1, 1
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)

    unet = build_unet(args.quick, device)
    llm = LLMInfo("Qwen2ForCausalLM", "qwen2", QWEN25_05B["hidden_size"], LLM_LAYERS, "tokfp1:random")
    default_blocks, all_blocks = ArchConfig().timestep_blocks, ArchConfig().resampler_layers
    adapters = {blocks: LLMDiffAdapter(AdapterConfig(llm=llm, target=TARGETS["sd15"],
                                                     arch=ArchConfig(timestep_aware=True, timestep_blocks=blocks)))
                .to(device).eval().requires_grad_(False) for blocks in sorted({default_blocks, all_blocks})}
    config = adapters[default_blocks].config
    sample = torch.randn(BATCH, 4, LATENT, LATENT, device=device)
    context = torch.randn(BATCH, CONTEXT_TOKENS, 768, device=device)
    t = torch.tensor([700.0, 700.0], device=device)
    print(f"UNet: random SD1.5 layout{' [--quick: tiny]' if args.quick else ''}, "
          f"{sum(p.numel() for p in unet.parameters()) / 1e6:.0f}M parameters, latent {LATENT}x{LATENT}, batch {BATCH}, "
          f"{CONTEXT_TOKENS} context tokens; adapter: sd15, timestep-aware, width {config.arch.width}, "
          f"{config.arch.refiner_layers} refiner + {config.arch.resampler_layers} resampler blocks, "
          f"{adapters[default_blocks].num_parameters() / 1e6:.1f}M parameters")
    print(f"torch {torch.__version__}, device {device}, fp32, {torch.get_num_threads()} threads, "
          f"{args.warmup} warm-up + median of {args.repeats}\n")

    rows = []
    with torch.no_grad():  # not inference_mode: FlopCounterMode's module hooks need ordinary tensors
        run_unet = lambda: unet(sample, t, encoder_hidden_states=context)  # noqa: E731
        unet_flops = count_flops(run_unet)
        for tokens in PROMPT_TOKENS:
            states = torch.randn(BATCH, LLM_LAYERS + 1, tokens, QWEN25_05B["hidden_size"], device=device)
            mask = torch.ones(BATCH, tokens, dtype=torch.long, device=device)
            cases = []
            for blocks, adapter in adapters.items():
                encoded = adapter.encode_states(states, mask)
                label = f"{blocks} modulated block{'s' if blocks > 1 else ''}{' (default)' if blocks == default_blocks else ''}"
                cases.append((f"decode, {label}, {tokens} prompt tokens",
                              lambda adapter=adapter, encoded=encoded: adapter.decode(encoded, mask, t)))
            adapter = adapters[default_blocks]
            cases.append((f"whole forward (no split), {tokens} prompt tokens", lambda: adapter(states, mask, t)))
            for name, fn in cases:
                flops = count_flops(fn)
                unet_ms, ms = median_ms_pair(run_unet, fn, device, args.warmup, args.repeats)
                rows.append((name, flops, ms, unet_ms))

    print(f"| per UNet call (batch {BATCH}) | GFLOPs | vs UNet (FLOPs) | ms | vs UNet (time) |")
    print("|---|---:|---:|---:|---:|")
    unet_ms_all = [r[3] for r in rows]
    print(f"| SD1.5 UNet, {LATENT}x{LATENT} latent | {unet_flops / 1e9:.1f} | 100% | "
          f"{sorted(unet_ms_all)[len(unet_ms_all) // 2]:.1f} | 100% |")
    for name, flops, ms, unet_ms in rows:
        print(f"| adapter {name} | {flops / 1e9:.2f} | {flops / unet_flops:.2%} | {ms:.1f} | {ms / unet_ms:.2%} |")
    worst = max(r[1] for r in rows if r[0].startswith("decode") and "(default)" in r[0]) / unet_flops
    verdict = "not judged (--quick uses a tiny UNet)" if args.quick else ("met" if worst < GOAL_RATIO else "NOT met")
    print(f"\ngoal: decode (default arch) < {GOAL_RATIO:.0%} of an SD1.5 UNet call in FLOPs: {verdict} (worst {worst:.2%})")


if __name__ == "__main__":
    main()
