"""ELLA's timestep-aware connector (TSC) for SD1.5, rebuilt from its published description.

    UNet timestep t -> 320 sinusoidal features (flip_sin_to_cos, shift 0: the SD UNet's own embedding)
      -> Linear 320 -> 768, SiLU, Linear 768 -> 768                          = t_emb [B, 768]
    T5 encoder states [B, T, 2048] -> proj_in -> x [B, T, 768]
    64 learned latents + time_aware_linear(silu(t_emb))
      -> 6 Perceiver blocks (8 heads), each:
           latents += attn(q = AdaLN_1(latents), kv = [AdaLN_1(latents), AdaLN_2(x)])
           latents += mlp(AdaLN_ff(latents))      (768 -> 3072 -> 768, squared ReLU)
         AdaLN(h) = LayerNorm(h, no affine, eps 1e-6) * (1 + scale) + shift, (shift, scale) = Linear(silu(t_emb))
                                                                                   => context [B, 64, 768]

The output is SD1.5's cross-attention context as it is (no pooled vector). The reference attends to
every T5 position it is given (T5's own padding included); the optional mask here only hides
positions we add ourselves (batching prompts of different lengths), so the result is the same.

Every block normalises the T5 states with a timestep-dependent scale and shift before projecting
them to keys and values, so nothing after `proj_in` can be computed without t: `encode_states`
keeps the projected states, and `decode` (run at every UNet call by the ComfyUI wrapper) runs the
whole resampler. The per-prompt states ride in `EncodedStates.cross_kv` as a one-head
[B, T, 1, 768] entry (the same tensor as key and value slot), so the shared per-step machinery
(adapter/timestep_contexts.py) pads, batches and trims them like our own adapter's.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from ..model import AdapterOutput, EncodedStates, TimestepsLike, check_timesteps, timestep_embedding


@dataclass(frozen=True)
class EllaConfig:
    """The reference constructor's arguments (defaults: ELLA-SD1.5-TSC-T5XL)."""

    time_channel: int = 320
    time_embed_dim: int = 768
    width: int = 768
    layers: int = 6
    heads: int = 8
    num_latents: int = 64
    input_dim: int = 2048

    def to_dict(self) -> dict:
        return asdict(self)


class AdaLayerNorm(nn.Module):
    """LayerNorm without affine (eps 1e-6), then * (1 + scale) + shift from a Linear on silu(t_emb)."""

    def __init__(self, dim: int, time_dim: int):
        super().__init__()
        self.linear = nn.Linear(time_dim, 2 * dim)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        shift, scale = self.linear(F.silu(temb)).unsqueeze(1).chunk(2, dim=-1)
        return F.layer_norm(x, x.shape[-1:], eps=1e-6) * (1 + scale) + shift


class FusedAttention(nn.Module):
    """`nn.MultiheadAttention`'s parameters (fused in_proj, out_proj) over SDPA, with an optional key mask."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.zeros(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, query: torch.Tensor, key_value: torch.Tensor, key_mask: Optional[torch.Tensor]) -> torch.Tensor:
        wq, wk, wv = self.in_proj_weight.chunk(3)
        bq, bk, bv = self.in_proj_bias.chunk(3)
        split = lambda x: rearrange(x, "b t (h d) -> b h t d", h=self.heads)  # noqa: E731
        mask = None if key_mask is None else rearrange(key_mask, "b k -> b 1 1 k")
        out = F.scaled_dot_product_attention(split(F.linear(query, wq, bq)), split(F.linear(key_value, wk, bk)),
                                             split(F.linear(key_value, wv, bv)), attn_mask=mask)
        return self.out_proj(rearrange(out, "b h t d -> b t (h d)"))


class SquaredReLU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.square(torch.relu(x))


class PerceiverBlock(nn.Module):
    def __init__(self, dim: int, heads: int, time_dim: int):
        super().__init__()
        self.attn = FusedAttention(dim, heads)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(dim, dim * 4))
        self.mlp.add_module("sq_relu", SquaredReLU())
        self.mlp.add_module("c_proj", nn.Linear(dim * 4, dim))
        self.ln_1 = AdaLayerNorm(dim, time_dim)
        self.ln_2 = AdaLayerNorm(dim, time_dim)
        self.ln_ff = AdaLayerNorm(dim, time_dim)

    def forward(self, x: torch.Tensor, latents: torch.Tensor, temb: torch.Tensor, key_mask: Optional[torch.Tensor]) -> torch.Tensor:
        normed = self.ln_1(latents, temb)
        latents = latents + self.attn(normed, torch.cat([normed, self.ln_2(x, temb)], dim=1), key_mask)
        return latents + self.mlp(self.ln_ff(latents, temb))


class Connector(nn.Module):
    """The Perceiver resampler (`connector.*` in the published files)."""

    def __init__(self, config: EllaConfig):
        super().__init__()
        self.latents = nn.Parameter(torch.zeros(config.num_latents, config.width))
        self.time_aware_linear = nn.Linear(config.time_embed_dim, config.width)
        self.proj_in = nn.Linear(config.input_dim, config.width)
        self.perceiver_blocks = nn.ModuleList(PerceiverBlock(config.width, config.heads, config.time_embed_dim)
                                              for _ in range(config.layers))


class TimestepEmbedding(nn.Module):
    def __init__(self, channels: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(channels, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(features)))


class EllaAdapter(nn.Module):
    """T5 encoder states [B, T, 2048] + UNet timestep -> SD1.5 context [B, 64, 768]."""

    timestep_aware = True

    def __init__(self, config: EllaConfig):
        super().__init__()
        self.ella = config
        self.time_embedding = TimestepEmbedding(config.time_channel, config.time_embed_dim)
        self.connector = Connector(config)

    def encode_states(self, hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> EncodedStates:
        """The timestep-independent part: the T5 states through proj_in, as a one-head cross_kv entry.

        `attention_mask` is accepted for the common interface; every position given is used, as in the reference.
        """
        if hidden_states.dim() != 3 or hidden_states.shape[-1] != self.ella.input_dim:
            raise ValueError(f"ELLA expects T5 encoder states [batch, tokens, {self.ella.input_dim}], "
                             f"got {tuple(hidden_states.shape)}")
        x = self.connector.proj_in(hidden_states.to(self.connector.latents.dtype))
        x = x.unsqueeze(2)  # [B, T, 1, width]: the token axis where adapter/timestep_contexts.py pads and trims
        return EncodedStates(x.new_zeros(x.shape[0], 0, self.ella.width), ((x, x),), None)

    def decode(self, encoded: EncodedStates, attention_mask: Optional[torch.Tensor] = None,
               timesteps: Optional[TimestepsLike] = None) -> AdapterOutput:
        """The resampler at `timesteps` (a number or [B], 0..1000; None = adapter.model.FALLBACK_TIMESTEP).

        `attention_mask` [B, T] (1 = a position to attend to) hides padding added after encoding.
        """
        x = encoded.cross_kv[0][0][:, :, 0]
        batch = x.shape[0]
        t = check_timesteps(timesteps, batch, x.device)
        temb = self.time_embedding(timestep_embedding(t, self.ella.time_channel).to(x.dtype))
        latents = self.connector.latents.unsqueeze(0) + self.connector.time_aware_linear(F.silu(temb)).unsqueeze(1)
        key_mask = None
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            key_mask = torch.cat([torch.ones(batch, latents.shape[1], dtype=torch.bool, device=x.device),
                                  attention_mask.bool().to(x.device)], dim=1)
        for block in self.connector.perceiver_blocks:
            latents = block(x, latents, temb, key_mask)
        return AdapterOutput(latents, None)

    def forward(self, hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                timesteps: Optional[TimestepsLike] = None) -> AdapterOutput:
        return self.decode(self.encode_states(hidden_states), attention_mask, timesteps)
