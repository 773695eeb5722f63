"""`make demo`: the whole inference path on a tiny model made locally (no downloads).

Until the shapes benchmark lands (which trains an adapter end to end), the demo shows what the
nodes do under the hood: build a tiny random Qwen2 with the real Qwen2.5 tokenizer, write a
fresh adapter with `python -m adapter init`, encode prompts (the empty prompt and an over-budget
one included) to the pre-final-norm states of every layer, and run the adapter to SD1.5 and SDXL
conditioning. Outputs go to outputs/demo/ (summary.json, report.md).
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from adapter import encode_prompts, load_adapter, load_llm, read_adapter_config

OUT = Path("outputs/demo")
PROMPTS = [
    "a red circle left of a blue square",
    "",  # the empty prompt: template with an empty user span, a common negative
    "東京の夜景、ネオンの光 🌃",
    "a very long prompt " + "with many many words " * 80,
]


def main() -> None:
    from support.tiny_models import make_tiny_llm  # test fixture builder: tiny random LLM + real tokenizer

    OUT.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    llm_dir = make_tiny_llm(family="qwen2")
    print(f"[1/4] tiny LLM folder: {llm_dir}")
    summary: dict = {"llm": str(llm_dir), "targets": {}}
    llm = load_llm(llm_dir)
    for target in ("sd15", "sdxl"):
        adapter_file = OUT / f"tiny-qwen2-{target}.safetensors"
        subprocess.run([sys.executable, "-m", "adapter", "init", "--llm", str(llm_dir), "--target", target,
                        "--out", str(adapter_file), "--force"], check=True)
        print(f"[2/4] adapter written: {adapter_file}")
        config = read_adapter_config(adapter_file)
        adapter = load_adapter(adapter_file)
        with torch.no_grad():
            encoded = encode_prompts(llm, config.template, PROMPTS)
            out = adapter(encoded.hidden_states, encoded.attention_mask)
        print(f"[3/4] {target}: states {tuple(encoded.hidden_states.shape)} -> context {tuple(out.context.shape)}"
              + (f", pooled {tuple(out.pooled.shape)}" if out.pooled is not None else ""))
        summary["targets"][target] = {
            "hidden_states": list(encoded.hidden_states.shape),
            "context": list(out.context.shape),
            "pooled": None if out.pooled is None else list(out.pooled.shape),
            "context_rms": out.context.pow(2).mean().sqrt().item(),
            "prompts": [{"prompt": p[:60], "tokens": i.num_tokens, "truncated_tokens": i.truncated_tokens,
                         "warnings": i.warnings} for p, i in zip(PROMPTS, encoded.infos)],
        }
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    (OUT / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False))
    lines = ["# Demo: LLM -> adapter -> UNet conditioning", "", "| target | LLM states | context | pooled | context RMS |",
             "|---|---|---|---|---|"]
    for target, info in summary["targets"].items():
        lines.append(f"| {target} | {info['hidden_states']} | {info['context']} | {info['pooled']} | {info['context_rms']:.3f} |")
    (OUT / "report.md").write_text("\n".join(lines) + "\n")
    print(f"[4/4] done in {summary['seconds']} s; outputs in {OUT.resolve()}")


if __name__ == "__main__":
    main()
