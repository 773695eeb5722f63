"""TEST-ONLY: ComfyUI's own LLM classes (comfy/text_encoders/llama.py) loaded with a tiny_models folder's weights.

ComfyUI's single-file loader (`comfy.sd.load_text_encoder_state_dicts`, what CLIPLoader calls after
reading the file) recognises a file by its weight names and full-size shapes and builds a fixed
full-size config, so a tiny random model cannot go through it unchanged. `tiny_comfy_clip(folder,
family)` sends the tiny folder's state dict through that same function with the fewest test-only
changes:

1. `comfy.sd.detect_te_model` answers the family's TEModel (the tiny shapes do not match the
   full-size detection rules, e.g. Qwen 2.5 3B's 256-wide k_proj bias);
2. the tiny sizes go in through ComfyUI's own per-model config override,
   `model_options["<model name>_model_config"]` (SDClipModel applies it to the config dict);
3. `head_dim`, a class constant of ComfyUI's config dataclasses with no override, is the tiny
   model's while the modules are built, and is pinned on the config instance afterwards because
   the forward reads it there (rotary embedding).
4. `model_options["dtype"]` (CLIPLoader leaves it unset) defaults to fp32, so the parity test compares
   fp32 with fp32: ComfyUI's HiDream wrapper otherwise stores Llama 3's weights at most at ComfyUI's
   text-encoder dtype (fp16 on a CPU), which alone moves the states by ~2e-4 relative.

Everything else is ComfyUI's: the CLIP object and its ModelPatcher, the per-family wrapper and
tokenizer classes, dtype detection from the file (`llama_detect`), state-dict loading, and for Gemma
the SentencePiece model carried inside the file under `spiece_model`, as ComfyUI's Gemma files do.
The weight names need no mapping: ComfyUI's LLM files use the Hugging Face names (`model.layers.0...`)
and its modules are named to match.

Import only after ComfyUI is importable (devkit.comfy_pack.load_pack() or comfy_importable()).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
from pathlib import Path
from unittest import mock

# family -> (comfy.sd.TEModel name, ComfyUI's model name (config override key), config dataclass in llama.py)
COMFY_FAMILIES = {
    "qwen2": ("QWEN25_3B", "qwen25_3b", "Qwen25_3BConfig"),
    "qwen3": ("QWEN3_4B", "qwen3_4b", "Qwen3_4BConfig"),
    "llama": ("LLAMA3_8", "llama", "Llama2Config"),
    "gemma2": ("GEMMA_2_2B", "gemma2_2b", "Gemma2_2B_Config"),
    "gemma3": ("GEMMA_3_4B", "gemma3_4b", "Gemma3_4B_Config"),
}
# Sizes from config.json that ComfyUI's config dataclasses accept as fields.
_SIZE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "rms_norm_eps", "max_position_embeddings")


def comfy_state_dict(folder: Path) -> dict:
    """What ComfyUI reads from a single LLM file: the weights by their Hugging Face names, plus for
    SentencePiece tokenizers the model bytes under `spiece_model` (ComfyUI's Gemma files carry it)."""
    import torch
    from safetensors.torch import load_file

    folder = Path(folder)
    sd = {}
    for shard in sorted(folder.glob("*.safetensors")):
        sd.update(load_file(shard))
    spm = folder / "tokenizer.model"
    if spm.is_file():
        sd["spiece_model"] = torch.frombuffer(bytearray(spm.read_bytes()), dtype=torch.uint8)
    return sd


def comfy_config_overrides(folder: Path, family: str) -> dict:
    """The tiny folder's sizes as ComfyUI's config override for `family` (rope_theta where it is a field)."""
    import comfy.text_encoders.llama as comfy_llama

    hf = json.loads((Path(folder) / "config.json").read_text())
    config_class = getattr(comfy_llama, COMFY_FAMILIES[family][2])
    fields = {f.name for f in dataclasses.fields(config_class)}
    overrides = {name: hf[name] for name in _SIZE_FIELDS if name in hf}
    rope = hf.get("rope_parameters") or {}
    if "rope_theta" in fields and "rope_theta" in rope:  # Gemma 3's is a class constant (local, global)
        overrides["rope_theta"] = rope["rope_theta"]
    return overrides


def head_dim_of(folder: Path) -> int:
    hf = json.loads((Path(folder) / "config.json").read_text())
    return int(hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"])


# How tiny_variant() adapts a family's tiny folder so that both implementations compute the same thing:
# ComfyUI's SDClipModel wants more blocks than its default layer_idx (-2 for Qwen 3 / Gemma), ComfyUI leaves
# out sliding-window attention and Gemma 2's attention soft-capping (the tiny fixtures use a window of 8
# tokens; real windows, 1024 / 4096 tokens, exceed the adapter's prompt budget), and Gemma 3's global-layer
# rope (theta 1e6, linear factor 8) is a constant there. Six Gemma 3 blocks include one global block.
PARITY_VERSION = 1  # bump when PARITY_CHANGES or tiny_variant changes, so stale cached folders are not reused
PARITY_CHANGES = {
    "qwen2": dict(num_hidden_layers=3),
    "qwen3": dict(num_hidden_layers=3),
    "llama": dict(num_hidden_layers=3),
    "gemma2": dict(num_hidden_layers=3, sliding_window=4096, attn_logit_softcapping=None),
    "gemma3": dict(num_hidden_layers=6, sliding_window=4096, rope_parameters={
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}),
}


def parity_model(family: str) -> Path:
    """tiny_variant(family) with PARITY_CHANGES, built once per machine into the cache (atomic rename)."""
    from devkit.cache import build_folder_once, cache_dir

    return build_folder_once(cache_dir() / "tiny_llm_parity" / f"v{PARITY_VERSION}" / family,
                             lambda work: tiny_variant(family, work))


def tiny_variant(family: str, dest: Path, seed: int = 0, **changes) -> Path:
    """A Hugging Face folder like make_tiny_llm(family)'s (same tokenizer files) with config `changes` and
    new seeded random weights; `changes` defaults to PARITY_CHANGES[family]. Takes a few seconds."""
    import shutil

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from devkit.tiny_models import make_tiny_llm

    source, dest = make_tiny_llm(family=family), Path(dest)
    dest.mkdir(parents=True)
    config = AutoConfig.from_pretrained(source)
    for name, value in (changes or PARITY_CHANGES[family]).items():
        setattr(config, name, value)
    if family.startswith("gemma"):  # re-derive the local/global pattern of the new block count, as the configs do
        every = 2 if family == "gemma2" else 6
        config.layer_types = ["full_attention" if (i + 1) % every == 0 else "sliding_attention"
                              for i in range(config.num_hidden_layers)]
    elif getattr(config, "layer_types", None) is not None:
        config.layer_types = ["full_attention"] * config.num_hidden_layers
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).eval().save_pretrained(dest, safe_serialization=True)
    for item in source.iterdir():
        if not item.name.endswith(".safetensors") and item.name not in ("config.json", "generation_config.json"):
            shutil.copy(item, dest / item.name)
    return dest


def tiny_comfy_clip(folder: Path, family: str, state_dict: dict | None = None, dtype=None):
    """A real comfy.sd.CLIP for the tiny folder's model, built by ComfyUI's single-file loader (see above)."""
    import comfy.sd
    import comfy.text_encoders.llama as comfy_llama
    import torch

    te_model, model_name, config_name = COMFY_FAMILIES[family]
    head_dim = head_dim_of(folder)
    sd = dict(state_dict) if state_dict is not None else comfy_state_dict(folder)
    options = {f"{model_name}_model_config": comfy_config_overrides(folder, family), "dtype": dtype or torch.float32}
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(comfy.sd, "detect_te_model", lambda _sd: comfy.sd.TEModel[te_model]))
        stack.enter_context(mock.patch.object(getattr(comfy_llama, config_name), "head_dim", head_dim))
        clip = comfy.sd.load_text_encoder_state_dicts([sd], model_options=options)
    for module in clip.cond_stage_model.modules():
        if isinstance(module, comfy_llama.BaseLlama):
            module.model.config.head_dim = head_dim  # read by the forward; the class constant is restored
    return clip
