"""RouWei-Gemma's LLM -> SDXL adapter (`LLMToSDXLAdapter`), rebuilt from its published description.

    LLM states [B, T, llm_dim] (the LLM's LAST hidden state, after its final norm) and mask [B, T]
      -> Linear llm_dim -> 2048 (absent when llm_dim == 2048)
      -> padded/cut to max_input_len (512) with the mask, + learned input positions
      -> n_wide pre-LayerNorm transformer blocks (16 heads, key-padding mask, MLP x4 with exact GELU)
      -> 308 learned queries attend over the sequence (masked);
         gate g = sigmoid(Linear([queries, attended])), x = g * attended + (1 - g) * queries; LayerNorm
      -> + learned output positions, n_narrow blocks without a mask             => context [B, 308, 2048]
      -> one learned token attends over the 308 tokens -> Linear, LayerNorm, GELU, Linear => pooled [B, 1280]

308 = 4 x 77 tokens, so the context batches with a CLIP negative in one UNet call.

Parameter names are those of the re-saved files with separate q/k/v projections (one Linear per
projection, flat in the block); the original files store PyTorch `nn.MultiheadAttention`'s fused
`attn.in_proj_weight`, which `adapter.foreign.layouts` splits on load. Attention itself is
`torch.nn.functional.scaled_dot_product_attention`, which reproduces `nn.MultiheadAttention` in
eval mode (no dropout: the reference trains with dropout 0.1, inference never applies it).

The adapter does not depend on the diffusion timestep: `encode_states` computes everything and
`decode` hands it back, so it plugs into the same encode path as our static adapters.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from ..model import AdapterOutput, EncodedStates


@dataclass(frozen=True)
class RouWeiConfig:
    """The reference constructor's arguments (the published files all use 16 heads)."""

    llm_dim: int = 1152
    sdxl_seq_dim: int = 2048
    sdxl_pooled_dim: int = 1280  # 0 = no pooled head (a from-scratch module for a base without one)
    max_input_len: int = 512
    target_seq_len: int = 308
    n_wide_blocks: int = 2
    n_narrow_blocks: int = 3
    num_heads: int = 16
    mlp_ratio: float = 4.0

    def to_dict(self) -> dict:
        return asdict(self)


def _attend(query: torch.Tensor, key_value: torch.Tensor, q: nn.Linear, k: nn.Linear, v: nn.Linear, out: nn.Linear,
            heads: int, key_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Multi-head attention of `query` [B, Tq, D] over `key_value` [B, Tk, D]; key_mask [B, Tk] bool, True = real."""
    split = lambda x: rearrange(x, "b t (h d) -> b h t d", h=heads)  # noqa: E731
    mask = None if key_mask is None else rearrange(key_mask, "b k -> b 1 1 k")
    attended = F.scaled_dot_product_attention(split(q(query)), split(k(key_value)), split(v(key_value)), attn_mask=mask)
    return out(rearrange(attended, "b h t d -> b t (h d)"))


class RouWeiBlock(nn.Module):
    """Pre-LayerNorm self-attention block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(dim, dim) for _ in range(4))
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        # Indices 0 and 2 as in the published files (Linear, GELU, Linear; dropout only in training).
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor, key_mask: Optional[torch.Tensor]) -> torch.Tensor:
        normed = self.norm1(x)
        x = x + _attend(normed, normed, self.q_proj, self.k_proj, self.v_proj, self.out_proj, self.heads, key_mask)
        return x + self.mlp(self.norm2(x))


class RouWeiAdapter(nn.Module):
    """LLM last hidden state [B, T, llm_dim] + mask -> SDXL context [B, 308, 2048] and pooled [B, 1280]."""

    timestep_aware = False

    def __init__(self, config: RouWeiConfig):
        super().__init__()
        self.rouwei = config
        dim, heads = config.sdxl_seq_dim, config.num_heads
        self.seq_projection = nn.Linear(config.llm_dim, dim) if config.llm_dim != dim else None
        self.input_position_embeddings = nn.Parameter(torch.zeros(1, config.max_input_len, dim))
        self.output_position_embeddings = nn.Parameter(torch.zeros(1, config.target_seq_len, dim))
        self.wide_attention_blocks = nn.ModuleList(RouWeiBlock(dim, heads, config.mlp_ratio) for _ in range(config.n_wide_blocks))
        self.compression_queries = nn.Parameter(torch.zeros(1, config.target_seq_len, dim))
        self.compression_q_proj, self.compression_k_proj, self.compression_v_proj, self.compression_out_proj = (
            nn.Linear(dim, dim) for _ in range(4))
        self.compression_gate = nn.Sequential(nn.Linear(dim * 2, dim), nn.Sigmoid())
        self.compression_norm = nn.LayerNorm(dim)
        self.narrow_attention_blocks = nn.ModuleList(RouWeiBlock(dim, heads, config.mlp_ratio) for _ in range(config.n_narrow_blocks))
        if config.sdxl_pooled_dim:  # 0: a module trained from scratch for a base without a pooled vector (SD1.5)
            self.pooling_token = nn.Parameter(torch.zeros(1, 1, dim))
            self.pooling_q_proj, self.pooling_k_proj, self.pooling_v_proj, self.pooling_out_proj = (
                nn.Linear(dim, dim) for _ in range(4))
            # Indices 0, 1, 4 as in the published files (Linear, LayerNorm, GELU, dropout slot, Linear).
            self.pooled_projection = nn.Sequential(nn.Linear(dim, dim), nn.LayerNorm(dim), nn.GELU(), nn.Identity(),
                                                   nn.Linear(dim, config.sdxl_pooled_dim))

    def _fit_input(self, states: torch.Tensor, mask: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Pad (zeros, masked out) or cut the token axis to max_input_len; no mask = every given token is real."""
        batch, length, _ = states.shape
        limit = self.rouwei.max_input_len
        if mask is None:
            mask = torch.ones(batch, length, dtype=torch.bool, device=states.device)
        mask = mask.bool()
        if length > limit:
            return states[:, :limit], mask[:, :limit]
        if length < limit:
            states = F.pad(states, (0, 0, 0, limit - length))
            mask = F.pad(mask, (0, limit - length), value=False)
        return states, mask

    def encode_states(self, hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> EncodedStates:
        """Everything (nothing here depends on the timestep): context in `queries`, pooled in `pooled`."""
        if hidden_states.dim() != 3 or hidden_states.shape[-1] != self.rouwei.llm_dim:
            raise ValueError(f"RouWei adapter expects LLM states [batch, tokens, {self.rouwei.llm_dim}], "
                             f"got {tuple(hidden_states.shape)}")
        x = hidden_states.to(self.input_position_embeddings.dtype)
        if self.seq_projection is not None:
            x = self.seq_projection(x)
        x, mask = self._fit_input(x, attention_mask)
        x = x + self.input_position_embeddings
        for block in self.wide_attention_blocks:
            x = block(x, mask)

        queries = self.compression_queries.expand(x.shape[0], -1, -1)
        attended = _attend(queries, x, self.compression_q_proj, self.compression_k_proj, self.compression_v_proj,
                           self.compression_out_proj, self.rouwei.num_heads, mask)
        gate = self.compression_gate(torch.cat([queries, attended], dim=-1))
        context = self.compression_norm(gate * attended + (1 - gate) * queries) + self.output_position_embeddings
        for block in self.narrow_attention_blocks:
            context = block(context, None)

        if not self.rouwei.sdxl_pooled_dim:
            return EncodedStates(context, (), None)
        token = self.pooling_token.expand(context.shape[0], -1, -1)
        pooled = _attend(token, context, self.pooling_q_proj, self.pooling_k_proj, self.pooling_v_proj,
                         self.pooling_out_proj, self.rouwei.num_heads, None)
        return EncodedStates(context, (), self.pooled_projection(pooled[:, 0]))

    def decode(self, encoded: EncodedStates, attention_mask: Optional[torch.Tensor] = None, timesteps=None) -> AdapterOutput:
        return AdapterOutput(encoded.queries, encoded.pooled)

    def forward(self, hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, timesteps=None) -> AdapterOutput:
        return self.decode(self.encode_states(hidden_states, attention_mask))
