"""LLMDiffAdapter: every layer of a decoder-only LLM in, Stable Diffusion conditioning out.

    hidden_states [B, L+1, T, H] (embedding output + every block's residual stream, pre final norm)
      -> per-layer RMS normalisation      (decoder layers differ wildly in scale; token 0 is huge)
      -> fusion over layers               ("all": learned softmax over L+1, uniform at init; "last")
      -> Linear H -> D
      -> refiner: non-causal blocks       (a decoder token never saw the tokens after it)
      -> resampler: N learned queries     (fixed-length context; N = 77 batches with a CLIP negative;
                                           arch.output "per_token": query i starts from token i too)
      -> head: LayerNorm, Linear D -> C, learned scale   => context [B, N, C], RMS ~1 at init
      -> (SDXL) attention pool -> Linear D -> P, scale  => pooled [B, P]

Timestep-aware mode (ArchConfig.timestep_aware; after ELLA's timestep-aware connector):
the diffusion timestep t in [0, 1000) -> sinusoidal features (exactly diffusers' UNet2DConditionModel
embedding) -> MLP -> one vector per sample, which modulates the three pre-norms of the last
`arch.timestep_blocks` resampler blocks (adaLN: norm(x) * (1 + scale) + shift, and the residual
branch times (1 + gate)). The modulation projections start at zero, so at init the adapter equals
the static one for every t, and a static adapter's weights load into it unchanged. Neither the
refiner, nor the pooled head, nor the resampler blocks before the modulated ones see t: all of that
is computed once per prompt by `encode_states` (with the modulated blocks' cross-attention keys and
values of the prompt tokens), and `decode` (run at every UNet call by the ComfyUI wrapper) costs only
the 77 queries through the modulated blocks and the context head, whatever the prompt's length
(under 1% of an SD1.5 UNet call with the defaults: bench/timestep_overhead.py). Without a timestep,
a timestep-aware adapter uses FALLBACK_TIMESTEP.

Padding never reaches the output: padded positions are zeroed on the way in and are masked as
keys in every attention, so a prompt alone and the same prompt inside a padded batch give the
same output (up to float rounding).

Default sizes (ArchConfig): width D = 768, 12 heads, 2 refiner + 2 resampler blocks, MLP ratio 2.
For a 4096-wide, 32-block LLM and an SDXL target that is about 32M parameters: the projection is
3.1M, the refiner 9.5M, the resampler 14.2M, the heads 1.6M + 3.4M (pooled). MLP ratio 2 rather
than 4 keeps the adapter under 10% of a Qwen2.5-0.5B forward at 77 tokens (bench/adapter_overhead.py).
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Union

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.nn.utils import skip_init

from .attention import attention, check_backend
from .config import AdapterConfig
from .errors import AdapterMismatchError


# A timestep-aware adapter used without a timestep (e.g. plain LLMDiffTextEncode, no
# LLMDiffApplyAdapter) conditions every step as if t were this. 500 is the middle of the
# training range [0, 1000): training draws t uniformly, so it is the median timestep the adapter
# saw, and it is the single value that is at most 500 away from any step a sampler takes.
FALLBACK_TIMESTEP = 500.0
NUM_TRAIN_TIMESTEPS = 1000  # the timestep range of SD1.5 / SD2 / SDXL (diffusers' num_train_timesteps)
TIMESTEP_FREQ_DIM = 256  # sinusoidal features before the timestep MLP (DiT / PixArt use 256)

TimestepsLike = Union[torch.Tensor, float, int]


class AdapterOutput(NamedTuple):
    context: torch.Tensor  # [B, N, C]
    pooled: Optional[torch.Tensor]  # [B, P], or None when the target has no pooled vector


class EncodedStates(NamedTuple):
    """The timestep-independent part of the adapter for a batch of prompts (LLMDiffAdapter.encode_states).

    Cache it per prompt and call LLMDiffAdapter.decode(encoded, attention_mask, timesteps) at each
    step. Entries of equal token length T concatenate along the batch with `EncodedStates.cat`.
    """

    queries: torch.Tensor  # [B, N, D] the queries after the resampler blocks the timestep does not modulate
    # Per modulated block, the cross-attention's keys and values of the refined prompt tokens,
    # [B, T, heads, D / heads] each: they do not depend on t either, so decode never recomputes them.
    cross_kv: tuple[tuple[torch.Tensor, torch.Tensor], ...]
    pooled: Optional[torch.Tensor]  # [B, P] the pooled vector (t-independent), or None

    @staticmethod
    def cat(parts: "list[EncodedStates]") -> "EncodedStates":
        """Batch several EncodedStates (same T) into one, in order."""
        cross_kv = tuple((torch.cat([p.cross_kv[i][0] for p in parts]), torch.cat([p.cross_kv[i][1] for p in parts]))
                         for i in range(len(parts[0].cross_kv)))
        pooled = None if parts[0].pooled is None else torch.cat([p.pooled for p in parts])
        return EncodedStates(torch.cat([p.queries for p in parts]), cross_kv, pooled)


def check_timesteps(timesteps: Optional[TimestepsLike], batch: int, device: torch.device) -> torch.Tensor:
    """`timesteps` (None = FALLBACK_TIMESTEP, a number, or a tensor [B] / [1] / []) as a validated tensor [B]."""
    if timesteps is None:
        timesteps = FALLBACK_TIMESTEP
    t = torch.as_tensor(timesteps, device=device)
    if t.dtype == torch.bool or t.is_complex():
        raise TypeError(f"timesteps must be real numbers (diffusion timesteps in [0, 1000]), got {t.dtype}")
    if t.dim() == 0 or tuple(t.shape) == (1,):
        t = t.reshape(1).expand(batch)
    elif tuple(t.shape) != (batch,):
        raise ValueError(f"timesteps must be one number or a [batch] = [{batch}] tensor, got shape {tuple(t.shape)}")
    tf = t.float()
    if bool((~torch.isfinite(tf) | (tf < 0) | (tf > NUM_TRAIN_TIMESTEPS)).any()):  # one device sync, not three
        raise ValueError(
            f"timesteps must lie in [0, {NUM_TRAIN_TIMESTEPS}] (diffusers' scale, not sigmas and not 0..1 fractions), "
            f"got {t.tolist()}"
        )
    return t


def rms_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Scale each token vector to RMS 1 (no mean subtraction, no learned gain), in fp32."""
    x = x.float()
    return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps)


def timestep_embedding(timesteps: torch.Tensor, dim: int = TIMESTEP_FREQ_DIM, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features [B, dim] of timesteps [B], in fp32: [cos | sin] at geometric frequencies.

    The same embedding as diffusers' SD UNets (`get_timestep_embedding(t, dim, flip_sin_to_cos=True,
    downscale_freq_shift=0)`, Ho et al. 2020 / Vaswani et al. 2017), written out here so the adapter
    library needs no diffusers import.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps.float()[:, None] * freqs[None, :]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


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

    def keys_values(self, source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of `source`, split into heads: reusable for any queries that attend to it."""
        return self._split(self.to_k(source)), self._split(self.to_v(source))

    def forward(self, x: torch.Tensor, source: Optional[torch.Tensor], key_mask: Optional[torch.Tensor],
                kv: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
        """Attend from `x` to `source`, or to precomputed `kv` = keys_values(source)."""
        k, v = kv if kv is not None else self.keys_values(source)
        out = attention(self._split(self.to_q(x)), k, v, key_mask, self.backend)
        return self.to_out(rearrange(out, "b t h d -> b t (h d)"))

    def _split(self, t: torch.Tensor) -> torch.Tensor:
        return rearrange(t, "b t (h d) -> b t h d", h=self.heads)


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

    With `timestep_aware`, a timestep embedding modulates each of the three sub-layers (adaLN):
    pre-norm output * (1 + scale) + shift, and the residual branch times (1 + gate). The projection
    that makes (shift, scale, gate) is zero-initialised as in DiT's adaLN-Zero, but the gate acts as
    (1 + gate) rather than DiT's bare gate: a bare zero gate would switch every block off at init,
    while this way the block at init is exactly the static block (so training starts from, and a
    static adapter's weights load into, the same function).
    """

    def __init__(self, width: int, heads: int, mlp_ratio: float, dropout: float, timestep_aware: bool = False):
        super().__init__()
        self.norm_self = nn.LayerNorm(width)
        self.self_attn = Attention(width, heads)
        self.norm_cross = nn.LayerNorm(width)
        self.cross_attn = Attention(width, heads)
        self.norm_mlp = nn.LayerNorm(width)
        self.mlp = mlp(width, mlp_ratio)
        self.dropout = nn.Dropout(dropout)
        if timestep_aware:  # timestep embedding -> (shift, scale, gate) x (self-attn, cross-attn, MLP)
            # skip_init + zeros: no random draw, so a static and a timestep-aware adapter built from
            # the same seed share every common weight (a paired ablation starts from the same function).
            proj = skip_init(nn.Linear, width, 9 * width, device=torch.get_default_device())
            nn.init.zeros_(proj.weight)
            nn.init.zeros_(proj.bias)
            self.modulation = nn.Sequential(nn.SiLU(), proj)
        else:
            self.modulation = None

    def forward(self, queries: torch.Tensor, tokens: Optional[torch.Tensor], mask: Optional[torch.Tensor],
                temb: Optional[torch.Tensor] = None, kv: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
        """`kv`: the cross-attention's precomputed keys_values(tokens) (then `tokens` may be None)."""
        if self.modulation is None:
            h = self.norm_self(queries)
            queries = queries + self.dropout(self.self_attn(h, h, None))
            queries = queries + self.dropout(self.cross_attn(self.norm_cross(queries), tokens, mask, kv))
            return queries + self.dropout(self.mlp(self.norm_mlp(queries)))
        # [B, D] -> nine [B, 1, D] vectors, broadcast over the N queries.
        shift_s, scale_s, gate_s, shift_c, scale_c, gate_c, shift_m, scale_m, gate_m = (
            self.modulation(temb).unsqueeze(1).chunk(9, dim=-1))
        h = self.norm_self(queries) * (1 + scale_s) + shift_s
        queries = queries + self.dropout(self.self_attn(h, h, None)) * (1 + gate_s)
        h = self.norm_cross(queries) * (1 + scale_c) + shift_c
        queries = queries + self.dropout(self.cross_attn(h, tokens, mask, kv)) * (1 + gate_c)
        h = self.norm_mlp(queries) * (1 + scale_m) + shift_m
        return queries + self.dropout(self.mlp(h)) * (1 + gate_m)


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
        self.config = config
        num_states = config.llm.num_layers + 1
        # "all": softmax weights over the L+1 states, zeros -> uniform at init; "last" has no weights.
        self.layer_logits = nn.Parameter(torch.zeros(num_states)) if arch.fusion == "all" else None
        self.proj_in = nn.Linear(config.llm.hidden_size, arch.width)
        self.refiner = nn.ModuleList(
            RefinerBlock(arch.width, arch.heads, arch.mlp_ratio, arch.dropout) for _ in range(arch.refiner_layers)
        )
        self.refiner_norm = nn.LayerNorm(arch.width)
        # Unit-scale queries: they enter the residual stream beside cross-attention outputs of RMS ~1.
        # At 0.02 (the usual transformer init) the first cross-attention's output, the same for every
        # query, swamped them, and the 77 context tokens came out nearly identical (std across tokens
        # 0.013 after 600 shapes steps, against 0.36 in the teacher's context: bench/shapes/diagnose.py),
        # which turns the UNet's cross-attention into one global bias; at 1.0 they stay distinct
        # (0.47-0.65), and after 300 shapes steps validation epsilon-MSE is 0.0208 instead of 0.0214
        # (the empty prompt: 0.0209).
        self.queries = nn.Parameter(torch.randn(config.target.num_tokens, arch.width))
        # The first `fixed_blocks` resampler blocks never see t (all of them in a static adapter).
        self.fixed_blocks = arch.resampler_layers - (arch.timestep_blocks if arch.timestep_aware else 0)
        self.resampler = nn.ModuleList(
            ResamplerBlock(arch.width, arch.heads, arch.mlp_ratio, arch.dropout, timestep_aware=i >= self.fixed_blocks)
            for i in range(arch.resampler_layers)
        )
        self.context_head = OutputHead(arch.width, config.target.context_dim)
        if config.target.pooled_dim is not None:
            self.pool = AttentionPool(arch.width, arch.heads)
            self.pooled_head = OutputHead(arch.width, config.target.pooled_dim)
        else:
            self.pool = self.pooled_head = None
        # Timestep-aware mode: sinusoidal features of t -> MLP -> the vector every resampler block's
        # adaLN reads. Built last, so its random init leaves the other weights' seeded init unchanged.
        if arch.timestep_aware:
            self.timestep_mlp = nn.Sequential(
                nn.Linear(TIMESTEP_FREQ_DIM, arch.width), nn.SiLU(), nn.Linear(arch.width, arch.width))
        else:
            self.timestep_mlp = None
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

    @property
    def timestep_aware(self) -> bool:
        return self.timestep_mlp is not None

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor,
                timesteps: Optional[TimestepsLike] = None) -> AdapterOutput:
        """hidden_states `[B, L+1, T, H]`, attention_mask `[B, T]` (1 = real token) -> AdapterOutput.

        `timesteps`: the diffusion timestep of each sample, a tensor [B] or one number for the whole
        batch, in [0, 1000] (diffusers' scale, float or int). A static adapter ignores it; a
        timestep-aware one uses FALLBACK_TIMESTEP when it is None.
        """
        return self.decode(self.encode_states(hidden_states, attention_mask), attention_mask, timesteps)

    def encode_states(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> EncodedStates:
        """The part that does not depend on the timestep: layer norm, fusion, projection, refiner, pooled vector."""
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

        key_mask = _key_mask(mask)
        tokens = self.proj_in(fused.to(self.proj_in.weight.dtype))
        for block in self.refiner:
            tokens = block(tokens, key_mask)
        tokens = self.refiner_norm(tokens)

        queries = self.queries.unsqueeze(0).expand(tokens.shape[0], -1, -1)
        if self.config.arch.output == "per_token":  # slot i starts from token i (padding tokens add nothing)
            count = min(tokens.shape[1], queries.shape[1])
            layout = tokens[:, :count].masked_fill(~mask[:, :count, None], 0)
            queries = queries + F.pad(layout, (0, 0, 0, queries.shape[1] - count))
        for block in self.resampler[: self.fixed_blocks]:
            queries = block(queries, tokens, key_mask)
        cross_kv = tuple(block.cross_attn.keys_values(tokens) for block in self.resampler[self.fixed_blocks:])
        pooled = self.pooled_head(self.pool(tokens, key_mask)) if self.pool is not None else None
        return EncodedStates(queries, cross_kv, pooled)

    def decode(self, encoded: EncodedStates, attention_mask: torch.Tensor,
               timesteps: Optional[TimestepsLike] = None) -> AdapterOutput:
        """The per-step part: the timestep-modulated resampler blocks (none in a static adapter) and the context head.

        `attention_mask` is the [B, T] mask given to encode_states; `timesteps` as in forward().
        """
        queries = encoded.queries
        if self.timestep_mlp is not None:  # a static adapter has nothing left to run but the head
            batch, length = queries.shape[0], encoded.cross_kv[0][0].shape[1]
            key_mask = _key_mask(_check_mask(attention_mask, batch, length))
            temb = self.timestep_mlp(self._timestep_features(timesteps, batch, queries.device).to(queries.dtype))
            for block, kv in zip(self.resampler[self.fixed_blocks:], encoded.cross_kv):
                queries = block(queries, None, key_mask, temb, kv)
        return AdapterOutput(self.context_head(queries), encoded.pooled)

    def _timestep_features(self, timesteps: Optional[TimestepsLike], batch: int, device: torch.device) -> torch.Tensor:
        """Validate `timesteps` (None, a number, or a tensor [B] / [1] / []) -> sinusoidal features [B, F]."""
        return timestep_embedding(check_timesteps(timesteps, batch, device))

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
        return _check_mask(attention_mask, batch, length)

    @torch.no_grad()
    def start_at(self, context: torch.Tensor, pooled: Optional[torch.Tensor] = None, per_channel: bool = False) -> None:
        """Set the output heads so that, before training, the adapter's output has the statistics of a
        reference conditioning (the base model's own empty-prompt context [N', C], and pooled [P]).

        A CLIP context is far from zero-mean: most of its size is one per-channel offset shared by every
        token (on the shapes base, the per-channel mean has RMS 0.86 of a total 0.95). A fresh head is
        zero-mean, and Adam moves a bias by about the learning rate per step, so at 1e-3 the adapter
        spent its first several hundred steps walking to that offset while the frozen UNet saw
        out-of-distribution context. Here the bias starts at the per-channel mean, and the weights are
        scaled so that the per-token deviations have the reference's RMS.

        With `per_channel`, `context` should be the teacher's contexts of many captions [M, N', C] (and
        `pooled` [M, P]): every output channel then starts with the teacher's own offset and spread, i.e.
        weight row c scaled to norm std_c (the LayerNorm before it gives unit-variance inputs, so a row's norm
        is its channel's std) and bias c = mean_c; the pooled bias starts at the pooled mean. The adapter then
        starts inside the UNet's input distribution channel by channel, not only in its overall level.
        """
        context = context.reshape(-1, context.shape[-1]).float()
        mean = context.mean(dim=0)
        head = self.context_head
        head.proj.bias.copy_(mean.to(head.proj.bias.dtype))
        row_norms = head.proj.weight.float().pow(2).sum(dim=1).sqrt()
        if per_channel:
            spread = (context - mean).pow(2).mean(dim=0).sqrt()  # [C]
            head.proj.weight.mul_((spread.clamp_min(1e-3) / row_norms).unsqueeze(1).to(head.proj.weight.dtype))
        else:
            spread = (context - mean).pow(2).mean().sqrt()
            head.proj.weight.mul_(spread.clamp_min(1e-3) / row_norms.pow(2).mean().sqrt())
        if pooled is not None and self.pooled_head is not None:
            pooled = pooled.reshape(-1, pooled.shape[-1]).float().mean(dim=0)
            self.pooled_head.proj.bias.copy_(pooled.to(self.pooled_head.proj.bias.dtype))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def _check_mask(attention_mask: torch.Tensor, batch: int, length: int) -> torch.Tensor:
    """The [batch, length] padding mask as bool; every row must keep at least one token."""
    if tuple(attention_mask.shape) != (batch, length):
        raise ValueError(
            f"attention_mask must be [batch, tokens] = [{batch}, {length}] to match the states, "
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


def _key_mask(mask: torch.Tensor) -> Optional[torch.Tensor]:
    """Without padding, attend unmasked: lets SDPA pick its fastest (flash) kernels."""
    return None if bool(mask.all()) else mask
