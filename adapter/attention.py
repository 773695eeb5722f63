"""Masked multi-head attention over PyTorch's SDPA or, when installed and asked for, xformers.

One function so the adapter's blocks never care which kernel runs. Tensors use the
"BMHK" layout `[batch, tokens, heads, head_dim]` (xformers' native one; the blocks split
heads with einops), and the key padding mask says which keys are real.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from einops import rearrange

from .errors import ConfigError

BACKENDS = ("sdpa", "xformers")


def check_backend(backend: str) -> None:
    """Refuse an unknown backend, or xformers when it is not installed, with what to do instead."""
    if backend not in BACKENDS:
        raise ConfigError(f"attention backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
    if backend == "xformers":
        try:
            import xformers.ops  # noqa: F401  (only probing that it imports)
        except ImportError as err:
            raise ConfigError(
                f"attention backend 'xformers' was requested but xformers cannot be imported ({err}): "
                "install xformers for your torch build, or use the 'sdpa' backend"
            ) from None


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: Optional[torch.Tensor] = None,
    backend: str = "sdpa",
) -> torch.Tensor:
    """Attention of q `[B, Tq, heads, d]` over k, v `[B, Tk, heads, d]`; returns `[B, Tq, heads, d]`.

    `key_padding_mask` is a bool `[B, Tk]`, True for real keys: padded keys get no weight, so
    what sits at padded positions never reaches the output. Every row needs at least one real
    key (a fully masked row has no defined softmax); the adapter guarantees that.
    """
    if backend == "sdpa":
        mask = None
        if key_padding_mask is not None:
            # SDPA's bool mask means "may attend"; broadcast over heads and queries.
            mask = rearrange(key_padding_mask.bool(), "b k -> b 1 1 k")
        out = F.scaled_dot_product_attention(
            rearrange(q, "b t h d -> b h t d"),
            rearrange(k, "b t h d -> b h t d"),
            rearrange(v, "b t h d -> b h t d"),
            attn_mask=mask,
        )
        return rearrange(out, "b h t d -> b t h d")
    if backend == "xformers":
        return _xformers_attention(q, k, v, key_padding_mask)
    check_backend(backend)  # raises the clear error for an unknown name
    raise AssertionError("unreachable")


def _xformers_attention(q, k, v, key_padding_mask):
    try:
        import xformers.ops as xops
    except ImportError:
        check_backend("xformers")  # raises with the install hint
        raise
    bias = None
    if key_padding_mask is not None:
        batch, q_len, heads, _ = q.shape
        k_len = k.shape[1]
        # xformers wants an additive bias [B, heads, Tq, Tk] whose storage rows are aligned to
        # 8 elements: allocate a wider tensor and slice it, as the xformers docs recommend.
        aligned = (k_len + 7) // 8 * 8
        storage = q.new_zeros(batch, heads, q_len, aligned)
        bias = storage[..., :k_len]
        bias.masked_fill_(~rearrange(key_padding_mask.bool(), "b k -> b 1 1 k"), float("-inf"))
    return xops.memory_efficient_attention(q, k, v, attn_bias=bias)
