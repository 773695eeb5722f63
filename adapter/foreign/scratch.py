"""ELLA and RouWei modules in our own file format: started from scratch (`training.train --arch`), or a
fine-tuned published file written with `--export-format ours`.

A published file's key layout implies its text side (RouWei-Gemma: Gemma's chat template, skip_first;
ELLA: T5 states). A module of those architectures trained on another text model must be sampled with
the text side it was trained with, so it is kept in our self-describing format
(adapter/file_format.py): the AdapterConfig records the text model (`llm`, checked like our own
adapters'), the target, the prompt template, and `architecture` = {kind, preset, sizes, text side}.
The module itself is EllaAdapter / RouWeiAdapter with its own parameter names; `.config` is a
ForeignConfig (layout "ours"), so the node and the trainer run it through the published adapters' code
(adapter/foreign/text.py's encode_text with the recorded side).

Widths: neither architecture has an output projection, so its width is the base's cross-attention
width (ELLA's latents, RouWei's sequence dim); its input width is the text model's.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, replace
from typing import Optional

import torch
from torch import nn

from ..config import AdapterConfig, TargetSpec
from ..errors import AdapterMismatchError, ConfigError
from .ella import EllaAdapter, EllaConfig
from .layouts import ForeignConfig
from .rouwei import RouWeiAdapter, RouWeiConfig
from .text import ELLA_TEXT, ROUWEI_T5GEMMA_TEXT, TextSide, is_encoder, side_template, template_side

OURS_LAYOUT = "ours"  # ForeignConfig.layout of a module kept in our file format
ARCHS = {"ella": "ella", "rouwei-gemma": "rouwei"}  # the trainer's --arch values -> ForeignConfig.kind


@dataclass
class EllaSizes:
    """A from-scratch ELLA connector's free sizes ([ella] in the trainer's config; defaults: the published file).
    Its width is the base's context width, its input width the text model's."""

    layers: int = 6  # Perceiver blocks
    heads: int = 8
    num_latents: int = 64  # output tokens
    time_channel: int = 320  # sinusoidal timestep features (the SD UNet's own)
    time_embed_dim: int = 0  # 0 = the width, as in the published file


@dataclass
class RouWeiSizes:
    """A from-scratch RouWei module's free sizes ([rouwei] in the trainer's config; defaults: RouWei-Gemma).
    Its sequence width is the base's context width, its input width the text model's."""

    n_wide_blocks: int = 2  # blocks over the (padded) input sequence
    n_narrow_blocks: int = 3  # blocks over the output tokens
    num_heads: int = 16
    target_seq_len: int = 308  # output tokens (4 x 77)
    max_input_len: int = 512  # input tokens the module pads / cuts to (its learned input positions)
    mlp_ratio: float = 4.0
    # Std of the learned tokens (queries, positions, pooling token) at the start; not stored in the file. Unit scale,
    # as our own queries: at the usual 0.02 the 308 outputs stayed nearly identical on the shapes benchmark (std
    # across tokens 0.03 after 600 steps) and R stayed below the empty prompt's (-0.29); at 1.0, R 0.35
    # (docs/benchmarks.md).
    init_std: float = 1.0


def _positive(section: str, values: dict) -> None:
    bad = [f"{section}.{k} = {v}" for k, v in values.items()
           if v < 1 and not (k == "time_embed_dim" and v == 0) and not (k == "init_std" and v > 0)]
    if bad:
        raise ConfigError(f"{', '.join(bad)}: sizes must be >= 1 (init_std > 0)")


def fresh_config(arch: str, sizes, llm, target: TargetSpec, template) -> ForeignConfig:
    """The ForeignConfig of a fresh `arch` module ("ella" | "rouwei-gemma") for this text model and base target
    (`target.context_dim` and `pooled_dim` are the base's); ConfigError / AdapterMismatchError say what does not fit.
    `template` (an adapter.TemplateConfig with its chat template recorded) is the text side on a decoder LLM."""
    if arch not in ARCHS:
        raise ConfigError(f"unknown architecture {arch!r}: use ours, {', '.join(ARCHS)}")
    kind = ARCHS[arch]
    values = dataclasses.asdict(sizes)
    _positive(kind, values)
    width, input_dim = target.context_dim, llm.info.hidden_size
    heads = sizes.heads if kind == "ella" else sizes.num_heads
    if width % heads:
        raise ConfigError(f"{kind}.{'heads' if kind == 'ella' else 'num_heads'} = {heads} does not divide the module's "
                          f"width {width} (the base's context width: {arch} has no output projection); pick a divisor of {width}")
    encoder = is_encoder(llm)
    if kind == "ella":
        if target.pooled_dim is not None:
            raise AdapterMismatchError(
                f"--arch ella makes no pooled vector, but the base ({target.family}) needs a {target.pooled_dim}-wide one: "
                "use --arch rouwei-gemma (it has a pooled head) or ours for SDXL")
        time_dim = sizes.time_embed_dim or width
        if sizes.time_channel % 2:
            raise ConfigError(f"ella.time_channel must be even (sine and cosine halves), got {sizes.time_channel}")
        module = EllaConfig(time_channel=sizes.time_channel, time_embed_dim=time_dim, width=width, layers=sizes.layers,
                            heads=heads, num_latents=sizes.num_latents, input_dim=input_dim)
        side = ELLA_TEXT if encoder else template_side(template)
        out = TargetSpec(target.family, width, None, sizes.num_latents)
    else:
        module = RouWeiConfig(llm_dim=input_dim, sdxl_seq_dim=width, sdxl_pooled_dim=target.pooled_dim or 0,
                              max_input_len=sizes.max_input_len, target_seq_len=sizes.target_seq_len,
                              n_wide_blocks=sizes.n_wide_blocks, n_narrow_blocks=sizes.n_narrow_blocks,
                              num_heads=heads, mlp_ratio=float(sizes.mlp_ratio))
        side = replace(ROUWEI_T5GEMMA_TEXT, max_length=sizes.max_input_len) if encoder else template_side(template)
        out = TargetSpec(target.family, width, target.pooled_dim, sizes.target_seq_len)
    preset = f"{'ELLA' if kind == 'ella' else 'RouWei'}-style (trained by us)"
    return ForeignConfig(kind=kind, preset=preset, layout=OURS_LAYOUT, target=out, text=side, arch=module,
                         timestep_aware=kind == "ella", llm=llm.info)


def build(config: ForeignConfig) -> nn.Module:
    """The module a ForeignConfig describes, with `.config` set (weights as its constructor leaves them)."""
    module = (EllaAdapter if config.kind == "ella" else RouWeiAdapter)(config.arch)
    module.config = config
    return module


@torch.no_grad()
def initialise(module: nn.Module, token_std: float = 1.0) -> nn.Module:
    """Random starting weights for a fresh module: the constructors leave the learned tokens and ELLA's fused
    attention at zero (a published file overwrites them). Linear layers keep PyTorch's default init; RouWei's
    learned tokens are drawn with std `token_std`."""
    if isinstance(module, EllaAdapter):
        width = module.ella.width
        module.connector.latents.normal_(0.0, width ** -0.5)
        for block in module.connector.perceiver_blocks:
            nn.init.xavier_uniform_(block.attn.in_proj_weight)  # nn.MultiheadAttention's own init
            block.attn.in_proj_bias.zero_()
            block.attn.out_proj.bias.zero_()
            for norm in (block.ln_1, block.ln_2, block.ln_ff):  # each AdaLN starts as a plain LayerNorm
                norm.linear.weight.zero_()
                norm.linear.bias.zero_()
    else:
        for name in ("input_position_embeddings", "output_position_embeddings", "compression_queries", "pooling_token"):
            if hasattr(module, name):
                getattr(module, name).normal_(0.0, token_std)
    return module


def fresh_module(arch: str, sizes, llm, target: TargetSpec, template) -> nn.Module:
    """A fresh, initialised `arch` module (seed the global RNG first for a reproducible start)."""
    return initialise(build(fresh_config(arch, sizes, llm, target, template)), getattr(sizes, "init_std", 1.0))


# ----------------------------------------------------------------------------- our file format


def to_adapter_config(config: ForeignConfig, llm_info=None, training: Optional[dict] = None) -> AdapterConfig:
    """The AdapterConfig that stores a module of these architectures in our file format. `llm_info` is the text
    model it was trained with (needed when `config` came from a published file, which does not record one)."""
    info = config.llm or llm_info
    if info is None:
        raise ConfigError("our file format records the text model an adapter reads: pass the one it was trained with")
    text = dataclasses.asdict(config.text)
    template = side_template(config.text) if config.text.encoder == "template" else None
    del text["template"]  # the template lives in the config's own `template` section
    extra = {"template": template} if template is not None else {}
    return AdapterConfig(llm=info, target=config.target, concat_clip=False, training=dict(training or {}),
                         architecture={"kind": config.kind, "preset": config.preset, "sizes": config.arch.to_dict(), "text": text},
                         **extra)


def from_adapter_config(config: AdapterConfig) -> ForeignConfig:
    """The ForeignConfig of an our-format file whose `architecture` is set; ConfigError when it does not describe
    a module we can build."""
    arch = config.architecture
    kind = arch["kind"]
    try:
        sizes = (EllaConfig if kind == "ella" else RouWeiConfig)(**arch["sizes"])
        text = TextSide(**arch["text"])
    except TypeError as err:
        raise ConfigError(f"adapter config 'architecture' ({kind}): {err}") from None
    if text.encoder == "template":
        text = template_side(config.template)
    return ForeignConfig(kind=kind, preset=str(arch.get("preset") or "custom"), layout=OURS_LAYOUT, target=config.target,
                         text=text, arch=sizes, timestep_aware=kind == "ella", llm=config.llm)
