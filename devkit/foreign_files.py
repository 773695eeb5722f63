"""Random files in the published layouts of RouWei-Gemma and ELLA, for tests and benchmarks.

The modules of adapter.foreign are built with random weights and saved under the published key
names: ELLA's are the module's own; RouWei's module uses the separate q/k/v names, and `fused=True`
writes the original `nn.MultiheadAttention` layout (q, k, v concatenated into `attn.in_proj_*`).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from adapter.foreign import EllaAdapter, EllaConfig, RouWeiAdapter, RouWeiConfig
from adapter.foreign.layouts import fuse_attention


def _randomise(module: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if re.search(r"norm\d?\.weight$|pooled_projection\.1\.weight$", name):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif p.dim() == 2 and "embeddings" not in name and "queries" not in name and "latents" not in name:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def _save(tensors: dict, path: Path, config: dict, heads_key: str, published_heads: int) -> Path:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    # Published files carry no metadata; only a head count other than the published one has to be recorded.
    metadata = {"config": json.dumps({heads_key: config[heads_key]})} if config[heads_key] != published_heads else None
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def write_random_rouwei(path, config: RouWeiConfig = RouWeiConfig(), fused: bool = True, seed: int = 0,
                        dtype: torch.dtype = torch.float32) -> Path:
    module = RouWeiAdapter(config)
    _randomise(module, seed)
    tensors = {k: v.to(dtype) for k, v in module.state_dict().items()}
    return _save(fuse_attention(tensors) if fused else tensors, Path(path), config.to_dict(), "num_heads", 16)


def write_random_ella(path, config: EllaConfig = EllaConfig(), seed: int = 0, dtype: torch.dtype = torch.float32) -> Path:
    module = EllaAdapter(config)
    _randomise(module, seed)
    return _save({k: v.to(dtype) for k, v in module.state_dict().items()}, Path(path), config.to_dict(), "heads", 8)


def cached_public_adapters() -> dict:
    """name -> path of random files in the published shapes, built once into the shared cache:
    - rouwei-gemma-random.safetensors: the full-size RouWei-Gemma v0.1 shape (original fused layout, fp16
      as published), recognised as the RouWei-Gemma preset; it reads Gemma-3-1B's 1152-wide states;
    - ella-random.safetensors: ELLA-SD1.5-TSC's shape (768 wide, 64 latents, 6 blocks, 8 heads, 320/768
      timestep embedding) reading the tiny T5's 64-wide states instead of Flan-T5-XL's 2048.
    """
    from .cache import cache_dir

    folder = cache_dir() / "public_adapters" / "v1"
    files = {
        "rouwei-gemma-random.safetensors": lambda p: write_random_rouwei(p, RouWeiConfig(), fused=True, dtype=torch.float16),
        "ella-random.safetensors": lambda p: write_random_ella(p, EllaConfig(input_dim=64)),
    }
    out = {}
    for name, write in files.items():
        path = folder / name
        if not path.is_file():
            tmp = path.with_suffix(".tmp")
            write(tmp)
            tmp.rename(path)
        out[name] = path
    return out
