"""A random full-size Qwen2.5-3B text encoder: the smallest LLM ComfyUI's CLIPLoader recognises.

ComfyUI builds single-file LLMs with fixed full-size configs (comfy.sd.detect_te_model), so its
CLIPLoader path can only be tested end to end with a file of a real model's shape. Qwen2.5-3B (the
Omnigen2 text encoder) is the smallest, and ComfyUI ships its tokenizer. `build_qwen25_3b()` writes,
once per machine, into cache_dir()/"weights"/qwen25_3b-v<N>/:

    qwen25_3b_random.safetensors   bf16, the Hugging Face weight names (ComfyUI's single-file layout is
                                   the same), tied embedding (no lm_head.weight, as the release), ~6.2 GB
    hf/                            a Hugging Face folder over the same file: config.json of Qwen2.5-3B,
                                   ComfyUI's Qwen2.5 tokenizer files, model.safetensors -> the file
                                   (for `python -m adapter init` and the transformers path of the bench)

The tensors are generated and written one at a time straight into the safetensors layout (header,
then raw bytes), so building needs the memory of the largest tensor (the 622 MB embedding), not of
the model: about two minutes on 2 cores, 2.2 GB peak. Values: N(0, 0.02) like transformers' init, norm weights 1.
The folder is written to a temporary sibling and renamed, so an aborted build is never reused.

    python -m devkit.full_llm      # build (or find) it and print the paths
"""
from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

from devkit.cache import cache_dir, comfy_tokenizer_dir

FULL_LLM_VERSION = 1
SEED = 1234
FILE_NAME = "qwen25_3b_random.safetensors"
# Qwen/Qwen2.5-3B's config.json (the values that matter), i.e. ComfyUI's Qwen25_3BConfig.
QWEN25_3B_CONFIG = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 151936, "hidden_size": 2048,
    "intermediate_size": 11008, "num_hidden_layers": 36, "num_attention_heads": 16, "num_key_value_heads": 2,
    "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "hidden_act": "silu",
    "tie_word_embeddings": True, "use_sliding_window": False, "bos_token_id": 151643, "eos_token_id": 151643,
    "torch_dtype": "bfloat16",
}
_SAFETENSORS_DTYPES = {"torch.bfloat16": "BF16", "torch.float16": "F16", "torch.float32": "F32"}


@dataclass(frozen=True)
class FullLLM:
    file: Path  # the single file (models/text_encoders)
    folder: Path  # the Hugging Face folder over the same weights (models/LLM)

    @property
    def size_bytes(self) -> int:
        return self.file.stat().st_size


def weight_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Every weight of the Hugging Face model and its shape, from transformers itself (meta device: no memory)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    with torch.device("meta"):
        model = Qwen2ForCausalLM(Qwen2Config(**{k: v for k, v in config.items() if k != "architectures"}))
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if config.get("tie_word_embeddings"):
        shapes.pop("lm_head.weight", None)  # the release stores the embedding once
    return shapes


def write_random_safetensors(path: Path, shapes: dict[str, tuple[int, ...]], dtype_name: str = "bfloat16", seed: int = SEED) -> None:
    """Stream seeded random tensors into a safetensors file, one tensor in memory at a time."""
    import torch

    dtype = getattr(torch, dtype_name)
    names = sorted(shapes)
    header, offset = {}, 0
    for name in names:
        nbytes = dtype.itemsize
        for dim in shapes[name]:
            nbytes *= dim
        header[name] = {"dtype": _SAFETENSORS_DTYPES[str(dtype)], "shape": list(shapes[name]), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format allows space padding; keeps tensor data 8-byte aligned
    generator = torch.Generator().manual_seed(seed)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name in names:
            if name.endswith("norm.weight"):
                tensor = torch.ones(shapes[name], dtype=dtype)
            else:
                tensor = torch.empty(shapes[name], dtype=torch.float32).normal_(0.0, 0.02, generator=generator).to(dtype)
            f.write(tensor.numpy().tobytes() if dtype != torch.bfloat16 else tensor.view(torch.int16).numpy().tobytes())


def weights_dir() -> Path:
    return cache_dir() / "weights" / f"qwen25_3b-v{FULL_LLM_VERSION}"


def build_qwen25_3b() -> FullLLM:
    """The random Qwen2.5-3B file and its Hugging Face folder (built once, see the module doc)."""
    final = weights_dir()
    result = FullLLM(final / FILE_NAME, final / "hf")
    if (final / "complete").is_file():
        return result
    final.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    try:
        write_random_safetensors(work / FILE_NAME, weight_shapes(QWEN25_3B_CONFIG))
        hf = work / "hf"
        hf.mkdir()
        (hf / "config.json").write_text(json.dumps(QWEN25_3B_CONFIG, indent=2))
        for item in comfy_tokenizer_dir("qwen25_tokenizer").iterdir():
            shutil.copy(item, hf / item.name)
        (hf / "model.safetensors").symlink_to(Path("..") / FILE_NAME)  # relative: survives the rename
        (work / "complete").write_text("ok\n")
        try:
            os.rename(work, final)
        except OSError:
            if not (final / "complete").is_file():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return result


if __name__ == "__main__":
    built = build_qwen25_3b()
    print(f"{built.file} ({built.size_bytes / 2**30:.2f} GiB)\n{built.folder}")
