"""The trainer's configuration: one typed tree of dataclasses, TOML on top, the command line on top of that.

Precedence, lowest first (a contract, see docs/design.md section 8):
    defaults in code < --preset NAME (training/configs/NAME.toml) < --config FILE.toml < named flags < --set key=value

The defaults in code ARE the `dynamic-kl` preset, so a run without --preset trains the default recipe.
Every section is a dataclass so that a typo in a TOML file or a --set key is an error naming the
key, not a silently ignored setting. The resolved config is a plain dict (`to_dict`) that the
trainer prints, stores in every checkpoint and in the exported adapter's metadata.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union, get_args, get_origin, get_type_hints

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

from adapter.config import ArchConfig, TemplateConfig
from adapter.foreign.scratch import ARCHS, EllaSizes, RouWeiSizes
from training.losses import LossConfig

CONFIGS_DIR = Path(__file__).resolve().parent / "configs"
DEFAULT_PRESET = "dynamic-kl"
STAGES = ("image", "distill")


class TrainConfigError(ValueError):
    """A configuration value, key, preset or file is wrong; the message names it."""


@dataclass
class ModelConfig:
    base_model: str = ""  # diffusers folder (SD1.5 / SD2 / SDXL) or a single-file .safetensors checkpoint
    base_model_config: str = ""  # single file only: a diffusers folder of the same family, or an inference YAML
    # ("" = ComfyUI's shipped v1/v2 YAML when the trainer runs inside a ComfyUI install); training/models.py
    llm: str = ""  # Hugging Face-format LLM folder
    init_adapter: str = ""  # fine-tune this adapter file instead of starting from a fresh module
    concat_clip: bool = False  # train the CLIP-concat mode: frozen CLIP tokens, then the adapter's
    family: str = ""  # "" = detect from the UNet (sdxl if it takes size conditioning, sd2 if v-prediction / 1024)
    num_tokens: int = 77  # adapter tokens N (77 batches with a CLIP negative in one UNet call)
    llm_dtype: str = "auto"  # auto = the mixed-precision dtype on GPU, fp32 on CPU
    attention_backend: str = "sdpa"  # "sdpa" or "xformers" (UNet; needs xformers installed)
    # The architecture of a fresh adapter: "ours" (LLMDiffAdapter, sized by [arch]), or "ella" / "rouwei-gemma"
    # (sized by [ella] / [rouwei]; adapter/foreign/scratch.py). Not a key of [arch]: that section is written into
    # every adapter file of ours, so a new key there would change their format.
    arch: str = "ours"
    # What adapter.safetensors is written as: "source" = the format the adapter came in (a published
    # --init-adapter file's own key layout; our format otherwise), "ours" = our self-describing format.
    export_format: str = "source"


@dataclass
class DataConfig:
    path: str = ""  # image folder (.txt captions), folder with metadata.jsonl, or a folder/glob of .tar shards
    name: str = ""  # dataset name for provenance; "" = the folder's name
    resolution: int = 512  # bucket area is about resolution x resolution pixels
    buckets: bool = True  # aspect-ratio buckets; False = square centre crops
    bucket_step: int = 64  # bucket sides are multiples of this (must be a multiple of the VAE factor)
    max_aspect: float = 2.0  # widest bucket is max_aspect : 1
    caption_dropout: float = 0.1  # probability of training on the empty prompt (for classifier-free guidance)
    cache_latents: bool = True  # encode images with the VAE once, to disk, before training
    latent_cache_dir: str = ""  # "" = <output_dir>/latent_cache
    cache_llm_states: bool = False  # opt-in: the frozen LLM's states per caption on disk (training/state_cache.py)
    llm_cache_dir: str = ""  # "" = <output_dir>/llm_state_cache
    llm_cache_max_gb: float = 50.0  # refuse to build an LLM-state cache larger than this (layers x tokens x hidden)
    caption_column: str = "text"  # metadata.jsonl key holding the caption
    image_column: str = "file_name"  # metadata.jsonl key holding the image path


@dataclass
class OptimConfig:
    lr: float = 1e-4  # adapter learning rate
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    warmup_steps: int = 100
    schedule: str = "cosine"  # "constant" or "cosine" (to 10% of lr at max_steps); recomputed on resume
    grad_clip: float = 1.0  # max grad norm; 0 = off
    learned_weighting_lr: float = 1e-2  # the `learned` loss weighting's own optimizer group


@dataclass
class LoraConfig:
    enabled: bool = False  # optional UNet LoRA (peft), exported for ComfyUI's LoRA loader
    rank: int = 8
    alpha: float = 8.0
    lr: float = 1e-4  # its own learning rate
    target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])


@dataclass
class ValidationConfig:
    every: int = 0  # validation images every N steps (0 = only at the end when prompts are given)
    prompts: list[str] = field(default_factory=list)
    steps: int = 20  # sampler steps
    guidance: float = 5.0  # classifier-free guidance scale against the empty-prompt conditioning
    seed: int = 0


@dataclass
class DistillConfig:
    """The `distill` stage (training/distill.py): regress the adapter's context onto the base model's own
    text-encoder context for the same caption. Captions only: no images, no UNet forward."""

    captions: str = ""  # .txt (one caption per line) / .jsonl (data.caption_column) file or a dataset; "" = data.path
    cosine_weight: float = 0.1  # loss = per-slot MSE + cosine_weight x (1 - cosine per slot)
    pooled_weight: float = 1.0  # SDXL: weight of the same loss on the pooled vector
    cache_teacher: bool = True  # the teacher's contexts per caption on disk, computed once
    teacher_cache_dir: str = ""  # "" = <output_dir>/teacher_cache
    start_per_channel: bool = False  # start a fresh adapter at the teacher's per-channel mean and spread (measured: slower)
    start_captions: int = 512  # captions whose teacher contexts give those statistics (a fixed, seeded sample)


@dataclass
class DebugConfig:
    """Test-only hooks: they exist so the integration tests can reach error paths on tiny models."""

    inject_nan_at_step: list[int] = field(default_factory=list)  # the first sample's adapter context is NaN at these steps
    stop_after_step: int = 0  # exit(3) right after this step's checkpoint, as if the job were preempted


@dataclass
class TrainConfig:
    output_dir: str = "outputs/adapter"
    max_steps: int = 1000
    batch_size: int = 4  # per process
    seed: int = 0
    mixed_precision: str = "no"  # "no" | "fp16" | "bf16" (accelerate); GPU only
    gradient_checkpointing: bool = False
    checkpoint_every: int = 500
    checkpoints_keep: int = 3  # rotate: keep the newest N checkpoints
    resume: str = ""  # "" | "latest" | a checkpoint folder
    ema_decay: float = 0.999  # 0 = no EMA; otherwise the exported weights are the EMA weights
    log_every: int = 10
    max_nonfinite_steps: int = 10  # stop after this many skipped (non-finite loss) steps
    time_phases: bool = True  # per-phase timing (synchronises the GPU at phase boundaries)
    stage: str = "image"  # "image": diffusion training on images; "distill": captions only (the distill preset)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    arch: ArchConfig = field(default_factory=ArchConfig)
    ella: EllaSizes = field(default_factory=EllaSizes)  # --arch ella only
    rouwei: RouWeiSizes = field(default_factory=RouWeiSizes)  # --arch rouwei-gemma only
    template: TemplateConfig = field(default_factory=TemplateConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        """Cheap checks that need no files; the trainer checks paths and model fit later."""
        if self.max_steps < 1:
            raise TrainConfigError(f"max_steps must be >= 1, got {self.max_steps}")
        if self.batch_size < 1:
            raise TrainConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise TrainConfigError(f"mixed_precision must be no, fp16 or bf16, got {self.mixed_precision!r}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise TrainConfigError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if not 0.0 <= self.data.caption_dropout < 1.0:
            raise TrainConfigError(f"data.caption_dropout must be in [0, 1), got {self.data.caption_dropout}")
        if self.data.llm_cache_max_gb <= 0:
            raise TrainConfigError(f"data.llm_cache_max_gb must be > 0, got {self.data.llm_cache_max_gb}")
        if self.optim.schedule not in ("constant", "cosine"):
            raise TrainConfigError(f"optim.schedule must be constant or cosine, got {self.optim.schedule!r}")
        if self.stage not in STAGES:
            raise TrainConfigError(f"stage must be one of {', '.join(STAGES)}, got {self.stage!r}")
        if self.stage == "distill" and self.model.concat_clip:
            raise TrainConfigError("stage=distill regresses the adapter's own context onto the teacher's; the CLIP-concat "
                                   "mode appends the teacher's tokens anyway: drop --concat-clip for distillation")
        if self.distill.cosine_weight < 0 or self.distill.pooled_weight < 0:
            raise TrainConfigError(f"distill.cosine_weight and distill.pooled_weight must be >= 0, got "
                                   f"{self.distill.cosine_weight} and {self.distill.pooled_weight}")
        if self.model.arch not in ("ours", *ARCHS):
            raise TrainConfigError(f"model.arch (--arch) must be one of ours, {', '.join(ARCHS)}; got {self.model.arch!r}")
        if self.model.export_format not in ("source", "ours"):
            raise TrainConfigError(f"model.export_format (--export-format) must be source or ours, got {self.model.export_format!r}")
        if self.model.arch != "ours":
            clash = [what for what, on in (("--init-adapter", bool(self.model.init_adapter)),
                                           ("--concat-clip", self.model.concat_clip),
                                           ("data.cache_llm_states", self.data.cache_llm_states)) if on]
            if clash:
                raise TrainConfigError(
                    f"--arch {self.model.arch} starts a fresh module and cannot be combined with {', '.join(clash)}: "
                    "--init-adapter continues a file in its own architecture (leave --arch out), an ELLA / RouWei "
                    "module was never trained with CLIP tokens beside it, and its text side is not what the LLM-state "
                    "cache holds")
        if self.model.attention_backend not in ("sdpa", "xformers"):
            raise TrainConfigError(f"model.attention_backend must be sdpa or xformers, got {self.model.attention_backend!r}")
        self.arch.validate()
        self.template.validate()
        try:  # LossConfig checks its choices in __post_init__, which merging by setattr bypasses
            LossConfig(**dataclasses.asdict(self.loss))
        except ValueError as err:
            raise TrainConfigError(f"[loss]: {err}") from None


# ---------------------------------------------------------------------------------------------
# dict <-> dataclass, strictly typed


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check/convert one TOML value against the dataclass field's type hint."""
    origin = get_origin(hint)
    if origin is Union:  # Optional[X]
        if value is None:
            return None
        inner = [a for a in get_args(hint) if a is not type(None)]
        return _coerce(value, inner[0], key)
    if origin is list:
        (item,) = get_args(hint) or (Any,)
        if not isinstance(value, list):
            value = [value]  # `--set debug.inject_nan_at_step=3` means [3]
        return [_coerce(v, item, key) for v in value]
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise TrainConfigError(f"{key} must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise TrainConfigError(f"{key} must be an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise TrainConfigError(f"{key} must be a number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise TrainConfigError(f"{key} must be a string, got {value!r}")
    return value


def merge_into(obj: Any, values: dict[str, Any], where: str, prefix: str = "") -> None:
    """Overlay a nested dict onto a dataclass tree in place; unknown keys name themselves and `where`."""
    hints = get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in values.items():
        full = f"{prefix}{key}"
        if key not in names:
            raise TrainConfigError(f"{where}: unknown config key {full!r}; known keys here: {sorted(names)}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise TrainConfigError(f"{where}: {full!r} is a section; give it as [{full}] with keys inside")
            merge_into(current, value, where, prefix=f"{full}.")
        else:
            setattr(obj, key, _coerce(value, hints[key], full))


def load_toml(path: Path, where: str) -> dict[str, Any]:
    if not path.is_file():
        raise TrainConfigError(f"{where}: no such file {path}")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as err:
        raise TrainConfigError(f"{where}: {path} is not valid TOML: {err}") from None


def list_presets() -> list[str]:
    return sorted(p.stem for p in CONFIGS_DIR.glob("*.toml"))


def preset_path(name: str) -> Path:
    path = CONFIGS_DIR / f"{name}.toml"
    if not path.is_file():
        raise TrainConfigError(f"unknown preset {name!r}; presets are: {', '.join(list_presets())}")
    return path


def parse_set(item: str) -> tuple[str, Any]:
    """`key.sub=value`: the value is read as a TOML value (3, 0.5, true, [1, 2], "x"), else taken as a string."""
    if "=" not in item:
        raise TrainConfigError(f"--set {item!r}: expected key=value, e.g. --set loss.weighting=uniform")
    key, raw = item.split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # bare strings like `uniform` or paths
    return key.strip(), value


def nest(key: str, value: Any) -> dict[str, Any]:
    """'a.b.c', v -> {'a': {'b': {'c': v}}}"""
    out: dict[str, Any] = {}
    node = out
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


# ---------------------------------------------------------------------------------------------
# command line

# named flag -> config key (the flags are a pinned contract: docs/design.md section 8)
NAMED_FLAGS: dict[str, tuple[str, type, str]] = {
    "--base-model": ("model.base_model", str, "diffusers folder of SD1.5 / SD2 / SDXL, or a single-file checkpoint"),
    "--llm": ("model.llm", str, "Hugging Face-format LLM folder"),
    "--data": ("data.path", str, "image folder with .txt captions, a metadata.jsonl folder, or .tar shards"),
    "--output-dir": ("output_dir", str, "where checkpoints, logs and adapter.safetensors go"),
    "--max-steps": ("max_steps", int, "total optimizer steps (may grow on resume)"),
    "--batch-size": ("batch_size", int, "images per process per step"),
    "--resolution": ("data.resolution", int, "bucket area ~ resolution^2 pixels"),
    "--seed": ("seed", int, "seed of everything random"),
    "--resume": ("resume", str, "'latest' (starts fresh when there is none) or a checkpoint folder"),
    "--init-adapter": ("model.init_adapter", str, "fine-tune this adapter file: ours, or a published RouWei-Gemma / "
                       "RouWei-T5Gemma / ELLA file (exported again in its own key layout)"),
    "--checkpoint-every": ("checkpoint_every", int, "checkpoint every N steps"),
    "--mixed-precision": ("mixed_precision", str, "no | fp16 | bf16"),
    "--arch": ("model.arch", str, "architecture of a fresh adapter: ours (default), ella or rouwei-gemma (sized by "
               "[ella] / [rouwei]; docs/training_public_adapters.md)"),
    "--export-format": ("model.export_format", str, "source (default: a published --init-adapter file's own key "
                        "layout, else ours) or ours (our self-describing format, which records the text side)"),
    "--base-model-config": ("model.base_model_config", str,
                            "single-file --base-model only: a diffusers folder of the same family, or an inference YAML"),
}


REQUIRED_INPUTS = {"--base-model": "model.base_model", "--llm": "model.llm", "--data": "data.path"}

HELP_DESCRIPTION = """\
Train an LLM Diff Adapter: a decoder-only LLM (--llm) conditions a Stable Diffusion base model
(--base-model: SD1.5, SD2 or SDXL), trained on images with captions (--data).

Settings, lowest precedence first: defaults < --preset < --config < named flags < --set.
Every setting is a config key. The key in parentheses after a flag, e.g. (model.base_model), is the one
that flag sets: in a --config TOML file write it as `[model]` then `base_model = "..."`, on the command
line as `--set model.base_model=...`. --print-config lists every key with its resolved value."""


def preset_summary(name: str) -> str:
    """The first sentence of a preset's leading TOML comment: what the preset is."""
    comment = []
    for line in preset_path(name).read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        comment.append(line.lstrip("#").strip())
    text = " ".join(comment)
    end = text.find(". ")
    return text if end < 0 else text[: end + 1]


def help_epilog() -> str:
    names = list_presets()
    width = max(map(len, names)) + 2
    presets = "\n".join(f"  {name:<{width}}{preset_summary(name)}" for name in names)
    return (
        f"presets (--preset NAME = training/configs/NAME.toml; default {DEFAULT_PRESET}):\n{presets}\n\n"
        "examples:\n"
        "  one GPU:\n"
        "    python -m training.train --base-model models/sd15-diffusers --llm models/LLM/Qwen2.5-1.5B \\\n"
        "        --data datasets/my-images --output-dir outputs/qwen-sd15 --max-steps 20000 --mixed-precision bf16\n"
        "  8 GPUs on one node (torchrun; add --nnodes and --rdzv-endpoint for several nodes):\n"
        "    torchrun --nproc_per_node 8 -m training.train --config my-run.toml --resume latest"
    )


def missing_inputs(cfg: "TrainConfig") -> list[str]:
    """The required inputs this config lacks, as 'flag (key)'."""
    values = {"model.base_model": cfg.model.base_model, "model.llm": cfg.model.llm, "data.path": cfg.data.path}
    return [f"{flag} ({key})" for flag, key in REQUIRED_INPUTS.items() if not values[key]]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m training.train", description=HELP_DESCRIPTION, epilog=help_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", type=Path, help="TOML file over the preset")
    parser.add_argument("--preset", help=f"a preset from training/configs/ (default {DEFAULT_PRESET}): {', '.join(list_presets())}")
    for flag, (key, kind, help_text) in NAMED_FLAGS.items():
        parser.add_argument(flag, type=kind, default=None, help=f"{help_text} ({key})")
    parser.add_argument("--concat-clip", action="store_true", default=None, help="train the CLIP-concat mode (model.concat_clip)")
    parser.add_argument("--gradient-checkpointing", action="store_true", default=None, help="trade compute for UNet activation memory")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="any config key, e.g. --set loss.weighting=uniform")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return parser


def resolve_config(argv: Optional[list[str]] = None) -> tuple[TrainConfig, argparse.Namespace]:
    """Parse the command line and apply the layers in order; returns the validated config."""
    args = build_parser().parse_args(argv)
    cfg = TrainConfig()
    merge_into(cfg, load_toml(preset_path(args.preset or DEFAULT_PRESET), f"preset {args.preset or DEFAULT_PRESET}"), f"preset {args.preset or DEFAULT_PRESET}")
    if args.config is not None:
        merge_into(cfg, load_toml(args.config, "--config"), f"--config {args.config}")
    named: dict[str, Any] = {}
    for flag, (key, _, _) in NAMED_FLAGS.items():
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        if value is not None:
            named[key] = value
    if args.concat_clip:
        named["model.concat_clip"] = True
    if args.gradient_checkpointing:
        named["gradient_checkpointing"] = True
    for key, value in named.items():
        merge_into(cfg, nest(key, value), "named flag")
    for item in args.overrides:
        key, value = parse_set(item)
        merge_into(cfg, nest(key, value), f"--set {item}")
    cfg.validate()
    return cfg, args


# Keys holding local file or folder paths: a shared adapter file keeps only their last component.
PATH_KEYS = ("output_dir", "resume", "model.base_model", "model.base_model_config", "model.llm", "model.init_adapter",
             "data.path", "data.latent_cache_dir", "data.llm_cache_dir")


def shareable_dict(cfg: TrainConfig) -> dict[str, Any]:
    """`to_dict()` with every local path reduced to its name (an exported adapter must not leak the trainer's
    folders); any other value that is an absolute path is reduced the same way."""
    def name_of(value: str) -> str:
        return Path(value).name if value not in ("", "latest") else value

    def scrub(node: dict[str, Any], prefix: str) -> dict[str, Any]:
        out = {}
        for key, value in node.items():
            full = f"{prefix}{key}"
            if isinstance(value, dict):
                out[key] = scrub(value, f"{full}.")
            elif isinstance(value, str) and (full in PATH_KEYS or Path(value).is_absolute()):
                out[key] = name_of(value)
            else:
                out[key] = value
        return out

    return scrub(cfg.to_dict(), "")


def format_config(cfg: TrainConfig) -> str:
    return json.dumps(cfg.to_dict(), indent=2, sort_keys=False)
