"""Recognise a published adapter file by its key layout, infer its dimensions, and load it.

Files in the wild carry no config: which architecture a file holds, and its sizes, are read from
its tensor names and shapes. Known layouts:

- `rouwei-fused`: RouWei-Gemma / RouWei-T5Gemma as published (PyTorch `nn.MultiheadAttention`,
  fused `attn.in_proj_weight`);
- `rouwei-separate-qkv`: the same weights re-saved with separate q/k/v projections (as a popular
  fork of the reference node pack converts them);
- `ella-tsc`: ELLA's timestep-aware connector (`time_embedding.*`, `connector.*`).

A file matching none of them is refused with the closest layout and its missing, unexpected and
wrongly shaped tensors. Everything here works on names and shapes only, so a full-size manifest can
be checked on the meta device without any memory.

Head counts are the one thing shapes cannot tell: the published files use 16 (RouWei) and 8
(ELLA); a file whose metadata has a `config` JSON with `num_heads` / `heads` (as the small
reference files used in the tests do) overrides that.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

import torch

from ..config import TARGETS, LLMInfo, TargetSpec
from ..errors import AdapterFileError
from .ella import EllaAdapter, EllaConfig
from .rouwei import RouWeiAdapter, RouWeiConfig
from .text import ELLA_TEXT, ROUWEI_GEMMA_TEXT, ROUWEI_T5GEMMA_TEXT, TextSide

Shapes = Mapping[str, Sequence[int]]

# (file prefix of an nn.MultiheadAttention, prefix of our separate projections)
_ROUWEI_ATTENTION = re.compile(r"^(?:(?P<block>(?:wide|narrow)_attention_blocks\.\d+)\.attn\.|(?P<flat>compression|pooling)_attention\.)"
                               r"(?P<rest>in_proj_weight|in_proj_bias|out_proj\.weight|out_proj\.bias)$")
_BLOCK_INDEX = re.compile(r"^(wide_attention_blocks|narrow_attention_blocks|connector\.perceiver_blocks)\.(\d+)\.")


@dataclass(frozen=True)
class ForeignConfig:
    """What a recognised file is: enough for the nodes to check pairings and describe it."""

    kind: str  # "rouwei" | "ella"
    preset: str  # e.g. "RouWei-Gemma (gemma-3-1b)", or "custom" for sizes no published file has
    layout: str  # the matched key layout
    target: TargetSpec  # what it conditions: family, context width, pooled width, token count
    text: TextSide  # what the text side must produce (adapter/foreign/text.py)
    arch: object  # RouWeiConfig | EllaConfig
    timestep_aware: bool = False
    concat_clip: bool = False  # never trained with CLIP tokens beside its own
    # The text model it was trained with, when its file records it (our file format: adapter/foreign/scratch.py);
    # the published files do not, and pair with any text model of the right kind and width.
    llm: Optional[LLMInfo] = None

    def describe(self) -> str:
        dims = ", ".join(f"{k} {v}" for k, v in self.arch.to_dict().items())
        pooled = f" + pooled {self.target.pooled_dim}" if self.target.pooled_dim else ""
        return (f"{self.preset} [{self.kind}, layout {self.layout}] -> {self.target.family} context "
                f"{self.target.num_tokens} x {self.target.context_dim}{pooled}; text side: {self.text.describe()}; {dims}")


def _count_blocks(shapes: Shapes, prefix: str) -> int:
    indices = {int(m.group(2)) for key in shapes if (m := _BLOCK_INDEX.match(key)) and m.group(1) == prefix}
    return max(indices) + 1 if indices else 0


def _dim(shapes: Shapes, key: str, axis: int) -> int:
    if key not in shapes:
        raise KeyError(key)
    return int(shapes[key][axis])


# ----------------------------------------------------------------------------- RouWei


def _rouwei_config(shapes: Shapes, overrides: dict) -> RouWeiConfig:
    dim = _dim(shapes, "input_position_embeddings", 2)
    mlp = _dim(shapes, "wide_attention_blocks.0.mlp.0.weight", 0) if "wide_attention_blocks.0.mlp.0.weight" in shapes else 4 * dim
    return RouWeiConfig(
        llm_dim=_dim(shapes, "seq_projection.weight", 1) if "seq_projection.weight" in shapes else dim,
        sdxl_seq_dim=dim, sdxl_pooled_dim=_dim(shapes, "pooled_projection.4.weight", 0),
        max_input_len=_dim(shapes, "input_position_embeddings", 1),
        target_seq_len=_dim(shapes, "output_position_embeddings", 1),
        n_wide_blocks=_count_blocks(shapes, "wide_attention_blocks"),
        n_narrow_blocks=_count_blocks(shapes, "narrow_attention_blocks"),
        num_heads=int(overrides.get("num_heads", 16)), mlp_ratio=mlp / dim,
    )


def _rouwei_preset(config: RouWeiConfig) -> tuple[str, TextSide]:
    shape = (config.sdxl_seq_dim, config.sdxl_pooled_dim, config.target_seq_len, config.max_input_len)
    if shape == (2048, 1280, 308, 512) and config.num_heads == 16:
        if config.llm_dim == 1152 and config.n_wide_blocks == 2 and config.n_narrow_blocks == 3:
            return "RouWei-Gemma (gemma-3-1b)", ROUWEI_GEMMA_TEXT
        if config.llm_dim == 2304 and config.n_wide_blocks == 3 and config.n_narrow_blocks == 3:
            return "RouWei-T5Gemma (t5gemma-2b encoder)", ROUWEI_T5GEMMA_TEXT
    # Sizes no published file has: the text side follows whichever LLM is connected (checked by width).
    return "custom", replace(ROUWEI_GEMMA_TEXT, encoder="any", max_length=config.max_input_len)


def _split_fused(tensors: dict) -> dict:
    """Original layout -> our names: each fused in_proj becomes q/k/v projections."""
    out = {}
    for key, value in tensors.items():
        m = _ROUWEI_ATTENTION.match(key)
        if m is None:
            out[key] = value
            continue
        prefix = f"{m['block']}." if m["block"] else f"{m['flat']}_"
        rest = m["rest"]
        if rest.startswith("in_proj"):
            kind = "weight" if rest.endswith("weight") else "bias"
            for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3)):
                out[f"{prefix}{name}.{kind}"] = part
        else:
            out[f"{prefix}{rest}"] = value
    return out


def _fuse_names(shapes: Shapes) -> dict:
    """Our names -> the original layout's names and shapes (the inverse of _split_fused, on shapes only)."""
    out = {}
    pattern = re.compile(r"^(?:(?P<block>(?:wide|narrow)_attention_blocks\.\d+)\.|(?P<flat>compression|pooling)_)"
                         r"(?P<proj>q_proj|k_proj|v_proj|out_proj)\.(?P<kind>weight|bias)$")
    for key, shape in shapes.items():
        m = pattern.match(key)
        if m is None:
            out[key] = tuple(shape)
            continue
        prefix = f"{m['block']}.attn." if m["block"] else f"{m['flat']}_attention."
        if m["proj"] == "out_proj":
            out[f"{prefix}out_proj.{m['kind']}"] = tuple(shape)
        elif m["proj"] == "q_proj":
            out[f"{prefix}in_proj_{m['kind']}"] = (3 * shape[0], *shape[1:])
    return out


def fuse_attention(tensors: dict) -> dict:
    """Our names -> the original layout (the inverse of _split_fused): q/k/v concatenated into in_proj."""
    out = {}
    for key, shape in _fuse_names({k: tuple(v.shape) for k, v in tensors.items()}).items():
        m = _ROUWEI_ATTENTION.match(key)
        if m is None:
            out[key] = tensors[key]
            continue
        own = f"{m['block']}." if m["block"] else f"{m['flat']}_"
        rest = m["rest"]
        if rest.startswith("in_proj"):
            kind = "weight" if rest.endswith("weight") else "bias"
            out[key] = torch.cat([tensors[f"{own}{p}.{kind}"] for p in ("q_proj", "k_proj", "v_proj")])
        else:
            out[key] = tensors[f"{own}{rest}"]
    return out


# ----------------------------------------------------------------------------- ELLA


def _ella_config(shapes: Shapes, overrides: dict) -> EllaConfig:
    return EllaConfig(
        time_channel=_dim(shapes, "time_embedding.linear_1.weight", 1),
        time_embed_dim=_dim(shapes, "time_embedding.linear_1.weight", 0),
        width=_dim(shapes, "connector.latents", 1), num_latents=_dim(shapes, "connector.latents", 0),
        input_dim=_dim(shapes, "connector.proj_in.weight", 1),
        layers=_count_blocks(shapes, "connector.perceiver_blocks"), heads=int(overrides.get("heads", 8)),
    )


def _ella_preset(config: EllaConfig) -> tuple[str, TextSide]:
    if config == EllaConfig():
        return "ELLA-SD1.5-TSC-T5XL", ELLA_TEXT
    return "custom", ELLA_TEXT


# ----------------------------------------------------------------------------- the registry


@dataclass(frozen=True)
class Layout:
    name: str
    kind: str
    anchor: str  # a key only this family of layouts has (cheap first guess for "closest")
    infer: Callable[[Shapes, dict], object]
    preset: Callable[[object], tuple[str, TextSide]]
    build: Callable[[object], torch.nn.Module]
    to_file_names: Callable[[Shapes], dict] = field(default=lambda shapes: {k: tuple(v) for k, v in shapes.items()})
    to_module: Callable[[dict], dict] = field(default=lambda tensors: tensors)
    to_file: Callable[[dict], dict] = field(default=lambda tensors: tensors)  # module tensors -> this layout's


LAYOUTS = (
    Layout("rouwei-fused", "rouwei", "compression_queries", _rouwei_config, _rouwei_preset, RouWeiAdapter,
           to_file_names=_fuse_names, to_module=_split_fused, to_file=fuse_attention),
    Layout("rouwei-separate-qkv", "rouwei", "compression_queries", _rouwei_config, _rouwei_preset, RouWeiAdapter),
    Layout("ella-tsc", "ella", "connector.latents", _ella_config, _ella_preset, EllaAdapter),
)


@dataclass
class Match:
    layout: Layout
    config: Optional[object]
    missing: list = field(default_factory=list)
    unexpected: list = field(default_factory=list)
    wrong: list = field(default_factory=list)

    @property
    def problems(self) -> int:
        return len(self.missing) + len(self.unexpected) + len(self.wrong)

    def explain(self) -> str:
        parts = []
        for what, items in (("missing", self.missing), ("unexpected", self.unexpected), ("wrong shape", self.wrong)):
            if items:
                shown = ", ".join(items[:6]) + (f" and {len(items) - 6} more" if len(items) > 6 else "")
                parts.append(f"{what}: {shown}")
        return "; ".join(parts)


def _module_shapes(layout: Layout, config) -> dict:
    with torch.device("meta"):
        module = layout.build(config)
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def _match(layout: Layout, shapes: Shapes, overrides: dict) -> Match:
    try:
        config = layout.infer(shapes, overrides)
        expected = layout.to_file_names(_module_shapes(layout, config))
    except (KeyError, ValueError, ZeroDivisionError, RuntimeError) as err:  # a key the sizes are read from is absent
        missing = [str(err.args[0])] if isinstance(err, KeyError) else [f"(sizes unreadable: {err})"]
        return Match(layout, None, missing=missing)
    found = {k: tuple(v) for k, v in shapes.items()}
    return Match(
        layout, config,
        missing=sorted(set(expected) - set(found)), unexpected=sorted(set(found) - set(expected)),
        wrong=[f"{k} {list(found[k])} (expected {list(expected[k])})" for k in sorted(set(expected) & set(found))
               if found[k] != expected[k]],
    )


def recognise(shapes: Shapes, metadata: Optional[Mapping[str, str]] = None, source: str = "this file",
              heads: Optional[int] = None) -> ForeignConfig:
    """The ForeignConfig of a file with these tensor names -> shapes; AdapterFileError naming the closest layout.

    `heads` overrides the head count (which shapes cannot tell) over the metadata's and the published default.
    """
    overrides = {}
    if metadata and metadata.get("config"):
        try:
            overrides = json.loads(metadata["config"])
        except ValueError:
            overrides = {}
        overrides = overrides if isinstance(overrides, dict) else {}
    if heads is not None:
        overrides = {**overrides, "num_heads": heads, "heads": heads}
    matches = [_match(layout, shapes, overrides) for layout in LAYOUTS]
    exact = [m for m in matches if m.problems == 0]
    if exact:
        match = exact[0]
        preset, text = match.layout.preset(match.config)
        config = match.config
        target = _target(match.layout.kind, config)
        return ForeignConfig(kind=match.layout.kind, preset=preset, layout=match.layout.name, target=target, text=text,
                             arch=config, timestep_aware=match.layout.kind == "ella")
    # Closest: the layout whose own anchor the file has, then the fewest problems.
    closest = min(matches, key=lambda m: (m.layout.anchor not in shapes, m.problems))
    raise AdapterFileError(
        f"{source} is not an LLM Diff Adapter file and matches no known adapter layout "
        f"({', '.join(layout.name for layout in LAYOUTS)}). Closest: {closest.layout.name} ({closest.explain()}). "
        "If it is a RouWei-Gemma or ELLA file, re-download it; other architectures are not supported."
    )


def _target(kind: str, config) -> TargetSpec:
    if kind == "rouwei":
        sdxl = TARGETS["sdxl"]
        family = "sdxl" if (config.sdxl_seq_dim, config.sdxl_pooled_dim) == (sdxl.context_dim, sdxl.pooled_dim) else "custom"
        return TargetSpec(family, config.sdxl_seq_dim, config.sdxl_pooled_dim, config.target_seq_len)
    family = "sd15" if config.width == TARGETS["sd15"].context_dim else "custom"
    return TargetSpec(family, config.width, None, config.num_latents)


def file_shapes(header: dict) -> tuple[dict, dict]:
    """(tensor name -> shape, metadata) from a parsed safetensors header (adapter.file_format.read_header)."""
    metadata = header.get("__metadata__") or {}
    return {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}, metadata


def load_foreign_adapter(path, device="cpu", dtype: torch.dtype = torch.float32, heads: Optional[int] = None) -> torch.nn.Module:
    """Recognise and load a published adapter file; the module gets `.config` (a ForeignConfig)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from ..file_format import read_header

    path = Path(path)
    shapes, metadata = file_shapes(read_header(path))  # refuses pickles and truncated files before reading data
    config = recognise(shapes, metadata, source=str(path), heads=heads)
    try:
        tensors = load_file(path, device=str(torch.device(device)))
    except (SafetensorError, OSError) as err:
        raise AdapterFileError(f"{path} could not be read as safetensors ({err}): re-download it") from None
    return build_foreign_adapter(config, tensors, device=device, dtype=dtype)


def build_foreign_adapter(config: ForeignConfig, tensors: dict, device="cpu", dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The module for a recognised config, with `tensors` (in the file's layout) loaded strictly."""
    layout = next(layout for layout in LAYOUTS if layout.name == config.layout)
    with torch.device("meta"):
        module = layout.build(config.arch)
    module.load_state_dict(layout.to_module(tensors), strict=True, assign=True)
    module.config = config
    return module.to(device=device, dtype=dtype).eval()


# Where our trainer's provenance goes in a published-layout file: a key the other packs ignore, never
# `format` (which would make the loaders read it as our own self-describing format).
TRAINING_METADATA_KEY = "llm_diff_adapter_training"


def save_foreign_adapter(path, module: torch.nn.Module, training: Optional[dict] = None,
                         dtype: Optional[torch.dtype] = None) -> Path:
    """Write a published adapter module in the key layout it was loaded from (`module.config.layout`), so the
    original packs load it as before; the head count goes into `config` (shapes cannot tell it) and
    `training` (JSON) under TRAINING_METADATA_KEY. Written to a temporary file and renamed."""
    import os

    from safetensors.torch import save_file

    config = module.config
    layout = next(layout for layout in LAYOUTS if layout.name == config.layout)
    tensors = {k: v.detach().to("cpu", dtype or v.dtype).contiguous() for k, v in module.state_dict().items()}
    tensors = {k: v.contiguous() for k, v in layout.to_file(tensors).items()}
    heads_key = "num_heads" if config.kind == "rouwei" else "heads"
    metadata = {"config": json.dumps({heads_key: getattr(config.arch, heads_key)})}
    if training is not None:
        metadata[TRAINING_METADATA_KEY] = json.dumps(training, sort_keys=True)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)
    return path
