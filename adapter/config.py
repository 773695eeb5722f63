"""The adapter's configuration: everything needed to rebuild and validate the module.

It is stored as JSON in the adapter file's metadata (`config`), so every field here is part of
the file format: add fields with defaults, never rename or remove one (bump `FORMAT_VERSION`
in file_format.py and add a migration instead).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

from .errors import ConfigError


@dataclass
class TemplateConfig:
    """How a prompt becomes tokens. Part of the adapter: training and inference must agree."""

    use_chat_template: bool = True  # wrap in the tokenizer's chat template when it has one
    system_prompt: str = ""  # "" = no system turn
    instruction: str = ""  # put before the user's prompt, inside the user turn (Sana / Lumina2 style)
    max_tokens: int = 256  # budget for the user's prompt span, in tokens
    truncation: str = "end"  # "end": drop the prompt's tail, with a warning the caller can show
    # The chat template (Jinja) the adapter was made with, recorded from the training tokenizer by
    # template.record_chat_template (`adapter init`, the trainer). It is used instead of the tokenizer's
    # own on every path, so another packaging of the same tokenizer (ComfyUI's single files carry none, or
    # another release's) renders the same tokens. "" (files made before it existed) = the tokenizer's own.
    chat_template: str = ""

    def validate(self) -> None:
        if self.max_tokens < 1:
            raise ConfigError(f"template.max_tokens must be >= 1, got {self.max_tokens}")
        if self.truncation not in ("end",):
            raise ConfigError(f"template.truncation must be 'end', got {self.truncation!r}")


@dataclass
class LLMInfo:
    """The LLM an adapter was built for; checked against the LLM it is used with."""

    architecture: str  # e.g. "Qwen2ForCausalLM"
    model_type: str  # e.g. "qwen2"
    hidden_size: int
    num_layers: int  # L transformer blocks; the adapter sees L + 1 states
    tokenizer_fingerprint: str
    name: str = ""  # informational only (folder or file name)


@dataclass
class TargetSpec:
    """The UNet conditioning the adapter produces."""

    family: str  # "sd15" | "sd2" | "sdxl" | "custom"
    context_dim: int  # C of the context [B, N, C]
    pooled_dim: Optional[int] = None  # 1280 for SDXL, else None
    num_tokens: int = 77  # N; multiples of 77 batch with a CLIP negative in one UNet call

    def validate(self) -> None:
        if self.family not in ("sd15", "sd2", "sdxl", "custom"):
            raise ConfigError(f"target.family must be one of sd15, sd2, sdxl, custom; got {self.family!r}")
        if self.context_dim < 1 or self.num_tokens < 1:
            raise ConfigError(f"target context_dim and num_tokens must be >= 1, got {self.context_dim}, {self.num_tokens}")
        if self.pooled_dim is not None and self.pooled_dim < 1:
            raise ConfigError(f"target.pooled_dim must be >= 1 or null, got {self.pooled_dim}")


TARGETS: dict[str, TargetSpec] = {
    "sd15": TargetSpec("sd15", 768, None, 77),
    "sd2": TargetSpec("sd2", 1024, None, 77),
    "sdxl": TargetSpec("sdxl", 2048, 1280, 77),
}


def make_target(family: str, num_tokens: int = 77, context_dim: Optional[int] = None, pooled_dim: Optional[int] = None) -> TargetSpec:
    """A TargetSpec for a known family (with optional overrides) or a 'custom' one (context_dim required)."""
    if family in TARGETS:
        base = TARGETS[family]
        spec = TargetSpec(family, context_dim or base.context_dim, pooled_dim if pooled_dim is not None else base.pooled_dim, num_tokens)
    elif family == "custom":
        if context_dim is None:
            raise ConfigError("a custom target needs --context-dim (the UNet's cross-attention width)")
        spec = TargetSpec("custom", context_dim, pooled_dim, num_tokens)
    else:
        raise ConfigError(f"unknown target {family!r}: use sd15, sd2, sdxl or custom")
    spec.validate()
    return spec


OUTPUT_MODES = ("resampler", "per_token")


@dataclass
class ArchConfig:
    """Hyper-parameters of LLMDiffAdapter (see adapter/model.py for what each stage does)."""

    width: int = 768  # adapter width D
    heads: int = 12
    refiner_layers: int = 2  # bidirectional blocks over the LLM tokens
    resampler_layers: int = 2  # blocks in which the N queries cross-attend to the tokens
    mlp_ratio: float = 2.0  # 2, not 4: keeps the adapter under 10% of a 0.5B LLM's forward at 77 tokens (bench/adapter_overhead.py)
    fusion: str = "all"  # "all": learned softmax over the L+1 layers; "last": last layer only (ablation)
    per_layer_norm: bool = True  # RMS-normalise each layer's states before fusing
    dropout: float = 0.0
    # Timestep-aware mode: the diffusion timestep modulates the resampler blocks (adaLN, equal to
    # the static adapter at init). Files with false load exactly as before this mode existed.
    timestep_aware: bool = False
    # How many of the LAST resampler blocks the timestep modulates (timestep-aware mode only). The blocks
    # before them do not depend on t, so they run once per prompt (LLMDiffAdapter.encode_states) and only
    # these run at every UNet call: 1 keeps that per-step cost under 1% of an SD1.5 UNet call in FLOPs at
    # default width (bench/timestep_overhead.py); resampler_layers modulates every block, as ELLA does.
    timestep_blocks: int = 1
    # How the N context slots start before the resampler blocks. "resampler": N learned queries only.
    # "per_token": slot i also starts from the prompt's token i (its refined state, template tokens included,
    # in order), so the context keeps the prompt's token layout as CLIP's does (BOS, words, then padding
    # slots that are the learned vectors alone); the blocks then refine it. Same weights in both modes;
    # files without the key are "resampler".
    output: str = "resampler"

    def validate(self) -> None:
        if self.fusion not in ("all", "last"):
            raise ConfigError(f"arch.fusion must be 'all' or 'last', got {self.fusion!r}")
        if self.output not in OUTPUT_MODES:
            raise ConfigError(f"arch.output must be one of {', '.join(OUTPUT_MODES)}, got {self.output!r}")
        if self.width % self.heads != 0:
            raise ConfigError(f"arch.width ({self.width}) must be divisible by arch.heads ({self.heads})")
        if self.refiner_layers < 0 or self.resampler_layers < 1:
            raise ConfigError("arch.refiner_layers must be >= 0 and arch.resampler_layers >= 1")
        if self.timestep_aware and not 1 <= self.timestep_blocks <= self.resampler_layers:
            raise ConfigError(
                f"arch.timestep_blocks ({self.timestep_blocks}) must be between 1 and arch.resampler_layers "
                f"({self.resampler_layers}): it counts the resampler blocks the timestep modulates"
            )


@dataclass
class AdapterConfig:
    llm: LLMInfo
    target: TargetSpec
    template: TemplateConfig = field(default_factory=TemplateConfig)
    arch: ArchConfig = field(default_factory=ArchConfig)
    concat_clip: bool = False  # trained with frozen CLIP tokens beside the adapter's
    training: dict[str, Any] = field(default_factory=dict)  # provenance; empty until trained
    # None (and absent from the file) = our LLMDiffAdapter, sized by `arch`. Otherwise the module is of another
    # architecture (adapter/foreign/scratch.py): {"kind": "ella" | "rouwei", "preset": name, "sizes": its
    # constructor's arguments, "text": the adapter.foreign.text.TextSide it reads}; `arch` is then not written.
    architecture: Optional[dict[str, Any]] = None

    def validate(self) -> None:
        self.template.validate()
        self.target.validate()
        if self.architecture is None:
            self.arch.validate()
        elif not (isinstance(self.architecture, dict) and self.architecture.get("kind") in ("ella", "rouwei")
                  and isinstance(self.architecture.get("sizes"), dict) and isinstance(self.architecture.get("text"), dict)):
            raise ConfigError(f"adapter config 'architecture' must be an object with kind ella or rouwei, sizes and "
                              f"text, got {self.architecture!r}")
        if self.llm.hidden_size < 1 or self.llm.num_layers < 1:
            raise ConfigError(f"llm.hidden_size and llm.num_layers must be >= 1, got {self.llm.hidden_size}, {self.llm.num_layers}")

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        if self.architecture is None:
            del data["architecture"]  # our own adapters' files stay exactly as they were
        else:
            del data["arch"]  # our sizes do not describe another architecture's module
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "AdapterConfig":
        """Rebuild from JSON; unknown keys are an error (a typo must not pass silently)."""
        try:
            config = cls(
                llm=_build(LLMInfo, data["llm"], "llm"),
                target=_build(TargetSpec, data["target"], "target"),
                template=_build(TemplateConfig, data.get("template", {}), "template"),
                arch=_build(ArchConfig, data.get("arch", {}), "arch"),
                concat_clip=bool(data.get("concat_clip", False)),
                training=dict(data.get("training") or {}),
                architecture=data.get("architecture"),
            )
        except KeyError as missing:
            raise ConfigError(f"adapter config lacks the section {missing}") from None
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ConfigError(f"adapter config has unknown top-level keys: {sorted(unknown)}")
        config.validate()
        return config


def _build(kind, values: Any, section: str):
    if not isinstance(values, dict):
        raise ConfigError(f"adapter config section {section!r} must be an object, got {type(values).__name__}")
    known = {f.name for f in dataclasses.fields(kind)}
    unknown = set(values) - known
    if unknown:
        raise ConfigError(f"adapter config section {section!r} has unknown keys {sorted(unknown)}")
    try:
        return kind(**values)
    except TypeError as err:
        raise ConfigError(f"adapter config section {section!r}: {err}") from None
