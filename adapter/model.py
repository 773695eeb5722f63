"""LLMDiffAdapter: every layer of a decoder-only LLM in, Stable Diffusion conditioning out.

    hidden_states [B, L+1, T, H] (embedding output + every block's residual stream, pre final norm)
      -> per-layer RMS normalisation      (decoder layers differ wildly in scale; token 0 is huge)
      -> fusion over layers               ("all": learned softmax over L+1, uniform at init; "last")
      -> Linear H -> D
      -> refiner: non-causal blocks       (a decoder token never saw the tokens after it)
      -> resampler: N learned queries     (fixed-length context; N = 77 batches with a CLIP negative)
      -> head: LayerNorm, Linear D -> C, learned scale   => context [B, N, C], RMS ~1 at init
      -> (SDXL) attention pool -> Linear D -> P, scale  => pooled [B, P]

Padding never reaches the output: padded positions are zeroed on the way in and are masked as
keys in every attention, so a prompt alone and the same prompt inside a padded batch give the
same output (up to float rounding).

Default sizes (ArchConfig): width D = 768, 12 heads, 2 refiner + 2 resampler blocks, MLP ratio 2.
For a 4096-wide, 32-block LLM and an SDXL target that is about 32M parameters: the projection is
3.1M, the refiner 9.5M, the resampler 14.2M, the heads 1.6M + 3.4M (pooled). MLP ratio 2 rather
than 4 keeps the adapter under 10% of a Qwen2.5-0.5B forward at 77 tokens (bench/adapter_overhead.py).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from einops import rearrange
from torch import nn

from .attention import attention, check_backend
from .config import AdapterConfig
from .errors import AdapterMismatchError, ConfigError


class AdapterOutput(NamedTuple):
    context: torch.Tensor  # [B, N, C]
    pooled: Optional[torch.Tensor]  # [B, P], or None when the target has no pooled vector


def rms_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Scale each token vector to RMS 1 (no mean subtraction, no learned gain), in fp32."""
    x = x.float()
    return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps)


class Attention(nn.Module):
    """Multi-head attention of `x` over `source` (self-attention when they are the same tensor)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.backend = "sdpa"  # set through LLMDiffAdapter.set_attention_backend()
        self.to_q = nn.Linear(width, width)
        self.to_k = nn.Linear(width, width)
        self.to_v = nn.Linear(width, width)
        self.to_out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, source: torch.Tensor, key_mask: Optional[torch.Tensor]) -> torch.Tensor:
        split = lambda t: rearrange(t, "b t (h d) -> b t h d", h=self.heads)  # noqa: E731
        out = attention(split(self.to_q(x)), split(self.to_k(source)), split(self.to_v(source)), key_mask, self.backend)
        return self.to_out(rearrange(out, "b t h d -> b t (h d)"))


def mlp(width: int, ratio: float) -> nn.Sequential:
    hidden = int(width * ratio)
    return nn.Sequential(nn.Linear(width, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, width))


class RefinerBlock(nn.Module):
    """Pre-norm, non-causal transformer block: every token sees the whole prompt (padding masked)."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, dropout: float):
        super().__init__()
        self.norm_attn = nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.norm_mlp = nn.LayerNorm(width)
        self.mlp = mlp(width, mlp_ratio)
        self.dropout = nn.Dropout(dropout)

    def forward(self, tokens: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        h = self.norm_attn(tokens)
        tokens = tokens + self.dropout(self.attn(h, h, mask))
        return tokens + self.dropout(self.mlp(self.norm_mlp(tokens)))


class ResamplerBlock(nn.Module):
    """The N queries talk to each other, then read the prompt tokens (masked), then an MLP.

    Hook for the timestep-aware mode (ArchConfig.timestep_aware, not built yet): it would
    modulate the three pre-norms here with a timestep embedding (adaLN, as in ELLA).
    """

    def __init__(self, width: int, heads: int, mlp_ratio: float, dropout: float):
        super().__init__()
        self.norm_self = nn.LayerNorm(width)
        self.self_attn = Attention(width, heads)
        self.norm_cross = nn.LayerNorm(width)
        self.cross_attn = Attention(width, heads)
        self.norm_mlp = nn.LayerNorm(width)
        self.mlp = mlp(width, mlp_ratio)
        self.dropout = nn.Dropout(dropout)

    def forward(self, queries: torch.Tensor, tokens: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        h = self.norm_self(queries)
        queries = queries + self.dropout(self.self_attn(h, h, None))
        queries = queries + self.dropout(self.cross_attn(self.norm_cross(queries), tokens, mask))
        return queries + self.dropout(self.mlp(self.norm_mlp(queries)))


class OutputHead(nn.Module):
    """LayerNorm -> Linear D -> out, times a learned scalar scale.

    After the LayerNorm every vector has RMS 1; weights drawn with std 1/sqrt(D) and a zero bias
    then give outputs of RMS ~1 (the level of a CLIP context), and the scale starts at 1. The
    scale gives the optimiser one direct knob for the overall level the UNet wants.
    """

    def __init__(self, width: int, out_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.proj = nn.Linear(width, out_dim)
        nn.init.normal_(self.proj.weight, std=width**-0.5)
        nn.init.zeros_(self.proj.bias)
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.norm(x)) * self.scale


class AttentionPool(nn.Module):
    """One learned query attends over the (masked) prompt tokens: the pooled vector's source."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.query = nn.Parameter(torch.randn(1, 1, width) * 0.02)
        self.norm_query = nn.LayerNorm(width)
        self.attn = Attention(width, heads)

    def forward(self, tokens: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        query = self.norm_query(self.query).expand(tokens.shape[0], -1, -1)
        return self.attn(query, tokens, mask)[:, 0]


class LLMDiffAdapter(nn.Module):
    """Maps an LLM's per-layer hidden states to a UNet's cross-attention context (and pooled vector)."""

    def __init__(self, config: AdapterConfig, attention_backend: str = "sdpa"):
        super().__init__()
        config.validate()
        arch = config.arch
        if arch.timestep_aware:
            raise ConfigError(
                "arch.timestep_aware adapters are not supported by this version of the pack: "
                "update the pack, or build the adapter with timestep_aware = false"
            )
        self.config = config
        num_states = config.llm.num_layers + 1
        # "all": softmax weights over the L+1 states, zeros -> uniform at init; "last" has no weights.
        self.layer_logits = nn.Parameter(torch.zeros(num_states)) if arch.fusion == "all" else None
        self.proj_in = nn.Linear(config.llm.hidden_size, arch.width)
        self.refiner = nn.ModuleList(
            RefinerBlock(arch.width, arch.heads, arch.mlp_ratio, arch.dropout) for _ in range(arch.refiner_layers)
        )
        self.refiner_norm = nn.LayerNorm(arch.width)
        self.queries = nn.Parameter(torch.randn(config.target.num_tokens, arch.width) * 0.02)
        self.resampler = nn.ModuleList(
            ResamplerBlock(arch.width, arch.heads, arch.mlp_ratio, arch.dropout) for _ in range(arch.resampler_layers)
        )
        self.context_head = OutputHead(arch.width, config.target.context_dim)
        if config.target.pooled_dim is not None:
            self.pool = AttentionPool(arch.width, arch.heads)
            self.pooled_head = OutputHead(arch.width, config.target.pooled_dim)
        else:
            self.pool = self.pooled_head = None
        self.set_attention_backend(attention_backend)

    @property
    def attention_backend(self) -> str:
        return self._attention_backend

    def set_attention_backend(self, backend: str) -> None:
        """Switch every attention in the adapter to "sdpa" or "xformers" (checked to be importable)."""
        check_backend(backend)
        self._attention_backend = backend
        for module in self.modules():
            if isinstance(module, Attention):
                module.backend = backend

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> AdapterOutput:
        """hidden_states `[B, L+1, T, H]`, attention_mask `[B, T]` (1 = real token) -> AdapterOutput."""
        mask = self._check_inputs(hidden_states, attention_mask)
        # "last" reads only the final block's state; "all" reads every state.
        states = hidden_states[:, -1:] if self.layer_logits is None else hidden_states
        # Zero the padded positions: whatever the LLM left there (even NaN) must not leak.
        states = states.masked_fill(~rearrange(mask, "b t -> b 1 t 1"), 0)
        if self.config.arch.per_layer_norm:
            states = rms_normalize(states)
        if self.layer_logits is None:
            fused = states[:, 0]
        else:
            weights = torch.softmax(self.layer_logits.float(), dim=0)
            fused = torch.einsum("bltd,l->btd", states.float(), weights)

        # Without padding, attend unmasked: lets SDPA pick its fastest (flash) kernels.
        key_mask = None if bool(mask.all()) else mask
        tokens = self.proj_in(fused.to(self.proj_in.weight.dtype))
        for block in self.refiner:
            tokens = block(tokens, key_mask)
        tokens = self.refiner_norm(tokens)

        queries = self.queries.unsqueeze(0).expand(tokens.shape[0], -1, -1)
        for block in self.resampler:
            queries = block(queries, tokens, key_mask)
        context = self.context_head(queries)
        pooled = self.pooled_head(self.pool(tokens, key_mask)) if self.pool is not None else None
        return AdapterOutput(context, pooled)

    def _check_inputs(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Validate shapes against the config; returns the mask as bool."""
        llm = self.config.llm
        if hidden_states.dim() != 4:
            raise ValueError(
                f"hidden_states must be [batch, layers+1, tokens, hidden], got shape {tuple(hidden_states.shape)}"
            )
        batch, num_states, length, hidden = hidden_states.shape
        if num_states != llm.num_layers + 1 or hidden != llm.hidden_size:
            raise AdapterMismatchError(
                f"the LLM gave {num_states} layer states (a {num_states - 1}-block model) of width {hidden}, "
                f"but this adapter was built for {llm.architecture} with {llm.num_layers} blocks "
                f"({llm.num_layers + 1} states) of width {llm.hidden_size}: use the LLM the adapter was trained for"
            )
        if tuple(attention_mask.shape) != (batch, length):
            raise ValueError(
                f"attention_mask must be [batch, tokens] = [{batch}, {length}] to match hidden_states, "
                f"got {tuple(attention_mask.shape)}"
            )
        mask = attention_mask.bool()
        empty = (~mask.any(dim=1)).nonzero().flatten().tolist()
        if empty:
            raise ValueError(
                f"attention_mask rows {empty} have no real token; every prompt needs at least one "
                "(an empty prompt still carries its template tokens)"
            )
        return mask

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
