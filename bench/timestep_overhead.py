"""What exact timestep-aware conditioning adds per sampler step: the adapter's `decode` vs an SD1.5 UNet call.

The ComfyUI wrapper (LLMDiffApplyAdapter) caches `encode_states` per conditioning entry and
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
The `wrapper path` rows are what LLMDiffApplyAdapter's wrapper adds to every UNet call under CFG:
adapter/timestep_contexts.py's StepContexts for two conditioning entries as LLMDiffTextEncode stores them
(a positive of that many prompt tokens and the empty-prompt negative, both padded to the fixed length
of the default template: 16 template tokens of Qwen2.5's chat template + the 256-token budget), i.e.
trimming, batching, the one decode, the cache and assembling both contexts on the conditioning device;
the ComfyUI glue around it only copies a few dicts.
Goal: decode < 1% of the UNet step in FLOPs. The UNet's FLOPs grow with the latent size,
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
from adapter.timestep_contexts import StepContexts, StepStates, state_length
from bench.adapter_overhead import QWEN25_05B, median_ms_pair

BATCH, LATENT, CONTEXT_TOKENS = 2, 32, 77
PROMPT_TOKENS = (77, 256)
LLM_LAYERS = 24  # Qwen2.5-0.5B's shape; only the adapter's input side (not decode) depends on it
GOAL_RATIO = 0.01
TEMPLATE_TOKENS = 16  # Qwen2.5's chat template around an empty prompt (the negative), no system prompt


def step_entry(adapter: LLMDiffAdapter, states: torch.Tensor, mask: torch.Tensor) -> StepStates:
    """One conditioning entry as LLMDiffTextEncode stores it for the wrapper (nodes/timestep_aware/model_cond.py)."""
    encoded = adapter.encode_states(states, mask)
    context = adapter.decode(encoded, mask).context.cpu()  # the conditioning lives on the intermediate device
    length = state_length(TEMPLATE_TOKENS, adapter.config.template.max_tokens)
    return StepStates.build(encoded, mask, length, strength=1.0, context=context,
                            num_tokens=adapter.config.target.num_tokens, adapter_id="bench", adapter_name="bench")


def random_prompt(tokens: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """LLM states [1, L+1, tokens, H] and mask of one prompt (random: cost does not depend on values)."""
    return (torch.randn(1, LLM_LAYERS + 1, tokens, QWEN25_05B["hidden_size"], device=device),
            torch.ones(1, tokens, dtype=torch.long, device=device))


def wrapper_step(adapter: LLMDiffAdapter, entries: list, t: float) -> list:
    """What the wrapper computes per UNet call: a fresh per-call cache, one decode, every entry's context."""
    step = StepContexts(adapter)
    step.prepare(entries, [t])
    return [step.context(e, e.context, [t]) for e in entries]


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
            # The positive is the prompt inside the chat template; the negative the template alone.
            entries = [step_entry(adapter, *random_prompt(tokens + TEMPLATE_TOKENS, device)),
                       step_entry(adapter, *random_prompt(TEMPLATE_TOKENS, device))]
            cases.append((f"wrapper path (default), 2 entries: {tokens} + {TEMPLATE_TOKENS} tokens and the empty "
                          f"prompt's {TEMPLATE_TOKENS}, padded to {entries[0].mask.shape[1]}",
                          lambda entries=entries: wrapper_step(adapter, entries, 700.0)))
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
        label = name if name.startswith("wrapper") else f"adapter {name}"
        print(f"| {label} | {flops / 1e9:.2f} | {flops / unet_flops:.2%} | {ms:.2f} | {ms / unet_ms:.2%} |")
    judged = [r for r in rows if r[0].startswith("wrapper") or (r[0].startswith("decode") and "(default)" in r[0])]
    worst = max(r[1] for r in judged) / unet_flops
    verdict = "not judged (--quick uses a tiny UNet)" if args.quick else ("met" if worst < GOAL_RATIO else "NOT met")
    print(f"\ngoal: decode and the wrapper path (default arch) < {GOAL_RATIO:.0%} of an SD1.5 UNet call in FLOPs: "
          f"{verdict} (worst {worst:.2%})")
    timed = max(r[2] / r[3] for r in rows if r[0].startswith("wrapper"))
    print(f"wrapper path, timed on {device}: at most {timed:.2%} of a UNet call")


if __name__ == "__main__":
    main()
