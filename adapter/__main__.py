"""Command line for adapter files: create a fresh one, or inspect / upgrade an existing one.

    python -m adapter init --llm models/LLM/Qwen2.5-0.5B-Instruct --target sdxl --out models/llm_adapters/new.safetensors
    python -m adapter inspect models/llm_adapters/new.safetensors   # also describes RouWei-Gemma / ELLA files
    python -m adapter upgrade models/llm_adapters/old.safetensors

Errors the user can fix print ONE line, "error: ...", without a traceback (exit codes below).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

EXIT_OK, EXIT_USAGE, EXIT_BAD_FILE, EXIT_BAD_INPUT = 0, 2, 3, 4

EPILOG = f"""exit codes:
  {EXIT_OK}  success
  {EXIT_USAGE}  usage error (unknown option, missing argument, output exists without --force)
  {EXIT_BAD_FILE}  bad adapter file: missing, corrupt, truncated, pickled, not an adapter, newer format
  {EXIT_BAD_INPUT}  bad LLM folder or invalid setting (e.g. width not divisible by heads)
  1  unexpected internal error (a bug: please report it with the traceback)
"""


class UsageError(Exception):
    """Bad command-line use that argparse cannot see (e.g. refusing to overwrite a file)."""


def build_parser() -> argparse.ArgumentParser:
    from .config import ArchConfig, TemplateConfig

    arch, template = ArchConfig(), TemplateConfig()
    parser = argparse.ArgumentParser(
        prog="python -m adapter", description="Create, inspect and upgrade LLM Diff Adapter files (.safetensors).",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{init,inspect,upgrade}")

    init = sub.add_parser(
        "init", help="write a freshly initialised (untrained) adapter for an LLM and a UNet family",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    init.add_argument("--llm", required=True, type=Path,
                      help="Hugging Face-format LLM folder (config.json + tokenizer are read; weights are not)")
    init.add_argument("--target", required=True, choices=["sd15", "sd2", "sdxl", "custom"],
                      help="UNet family the context is for (custom needs --context-dim)")
    init.add_argument("--out", required=True, type=Path, help="adapter file to write (.safetensors)")
    init.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    init.add_argument("--tokens", type=int, default=77,
                      help="context tokens N (default 77; multiples of 77 batch with a CLIP negative in one UNet call)")
    init.add_argument("--context-dim", type=int, help="context width C (required for custom; overrides the family's)")
    init.add_argument("--pooled-dim", type=int, help="pooled vector width P (1280 for sdxl; none for others unless set)")
    init.add_argument("--fusion", choices=["all", "last"], default=arch.fusion,
                      help=f"layer fusion: learned softmax over every layer, or the last layer only (default {arch.fusion})")
    init.add_argument("--width", type=int, default=arch.width, help=f"adapter width D (default {arch.width})")
    init.add_argument("--heads", type=int, default=arch.heads, help=f"attention heads (default {arch.heads})")
    init.add_argument("--refiner-layers", type=int, default=arch.refiner_layers,
                      help=f"bidirectional refiner blocks (default {arch.refiner_layers})")
    init.add_argument("--timestep-aware", action="store_true",
                      help="modulate the resampler by the diffusion timestep (use with the Apply LLM Diff Adapter node)")
    init.add_argument("--timestep-blocks", type=int, default=arch.timestep_blocks,
                      help=f"how many of the last resampler blocks the timestep modulates (default {arch.timestep_blocks})")
    init.add_argument("--resampler-layers", type=int, default=arch.resampler_layers,
                      help=f"resampler blocks (default {arch.resampler_layers})")
    init.add_argument("--seed", type=int, default=0, help="random seed for the initial weights (default 0)")
    init.add_argument("--system-prompt", default=template.system_prompt, help="system turn of the chat template")
    init.add_argument("--instruction", default=template.instruction,
                      help="text put before every prompt inside the user turn")
    init.add_argument("--no-chat-template", action="store_true",
                      help="feed the prompt as plain text even when the tokenizer has a chat template")
    init.add_argument("--max-tokens", type=int, default=template.max_tokens,
                      help=f"token budget of the user's prompt; longer prompts are cut at the end (default {template.max_tokens})")
    init.set_defaults(func=cmd_init)

    inspect = sub.add_parser("inspect", help="print an adapter file's config and check that its weights fit it",
                             epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    inspect.add_argument("file", type=Path)
    inspect.set_defaults(func=cmd_inspect)

    upgrade = sub.add_parser("upgrade", help="rewrite an adapter of an older format_version at the current one",
                             epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    upgrade.add_argument("file", type=Path)
    upgrade.add_argument("--out", type=Path, help="where to write (default: replace FILE)")
    upgrade.set_defaults(func=cmd_upgrade)
    return parser


# --------------------------------------------------------------------------- init


def folder_tokenizer(folder: Path):
    """The folder's tokenizer, as load_llm loads it (its chat template is recorded into a new adapter)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder, local_files_only=True)


def llm_info_from_folder(folder: Path):
    """LLMInfo from config.json and the tokenizer alone (adapter.llm.llm_info): creating an adapter needs no LLM weights."""
    from transformers import AutoConfig, AutoTokenizer

    from .errors import LLMLoadError
    from .llm import llm_info

    if not (folder / "config.json").is_file():
        raise LLMLoadError(f"{folder} is not a Hugging Face-format LLM folder (no config.json)")
    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (ValueError, KeyError, OSError) as err:
        raise LLMLoadError(f"cannot read the LLM config or tokenizer in {folder}: {err}".replace("\n", " ")) from None
    return llm_info(config, tokenizer, folder.name)


def cmd_init(args) -> int:
    import torch

    from .config import AdapterConfig, ArchConfig, TemplateConfig, make_target
    from .file_format import save_adapter
    from .model import LLMDiffAdapter
    from .template import record_chat_template

    if args.out.exists() and not args.force:
        raise UsageError(f"{args.out} exists; pass --force to overwrite it")
    # The cheap settings are checked before the tokenizer is read, so typos fail fast.
    target = make_target(args.target, args.tokens, args.context_dim, args.pooled_dim)
    template = TemplateConfig(use_chat_template=not args.no_chat_template, system_prompt=args.system_prompt,
                              instruction=args.instruction, max_tokens=args.max_tokens)
    arch = ArchConfig(width=args.width, heads=args.heads, refiner_layers=args.refiner_layers,
                      resampler_layers=args.resampler_layers, fusion=args.fusion,
                      timestep_aware=args.timestep_aware, timestep_blocks=args.timestep_blocks)
    template.validate()
    arch.validate()
    config = AdapterConfig(llm=llm_info_from_folder(args.llm), target=target, arch=arch,
                           template=record_chat_template(template, folder_tokenizer(args.llm)))
    config.validate()
    if config.target.num_tokens % 77:
        print(f"note: {config.target.num_tokens} tokens is not a multiple of 77, so ComfyUI cannot batch this "
              "context with a 77-token CLIP negative in one UNet call", file=sys.stderr)
    torch.manual_seed(args.seed)
    adapter = LLMDiffAdapter(config)
    save_adapter(args.out, adapter)
    print(f"wrote {args.out}: untrained {config.target.family} adapter for {config.llm.name} "
          f"({adapter.num_parameters():,} parameters)")
    return EXIT_OK


# --------------------------------------------------------------------------- inspect / upgrade


def describe(path: Path, adapter, file_version: str) -> str:
    from .model import FALLBACK_TIMESTEP

    """The config, readably, one aspect per line."""
    c = adapter.config
    llm, target, arch, template = c.llm, c.target, c.arch, c.template
    pooled = f", pooled [{target.pooled_dim}]" if target.pooled_dim else ""
    chat = "off" if not template.use_chat_template else "on (recorded)" if template.chat_template else "on (the tokenizer's)"
    lines = [
        f"file:        {path}",
        f"format:      llm-diff-adapter, format_version {file_version}",
        f"llm:         {llm.name or '(unnamed)'}: {llm.architecture} ({llm.model_type}), hidden {llm.hidden_size}, "
        f"{llm.num_layers} layers",
        f"tokenizer:   {llm.tokenizer_fingerprint}",
        f"target:      {target.family}: context [{target.num_tokens}, {target.context_dim}]{pooled}",
        f"arch:        width {arch.width}, {arch.heads} heads, {arch.refiner_layers} refiner + {arch.resampler_layers} "
        f"resampler blocks, mlp x{arch.mlp_ratio:g}, fusion {arch.fusion}, per-layer norm "
        f"{'on' if arch.per_layer_norm else 'off'}, dropout {arch.dropout:g}",
        f"timestep:    " + (f"aware (last {arch.timestep_blocks} resampler block(s) modulated; without a timestep it uses "
                            f"the fixed fallback t = {FALLBACK_TIMESTEP:g})" if arch.timestep_aware else "static"),
        f"template:    chat template {chat}, "
        f"system prompt {template.system_prompt!r}, instruction {template.instruction!r}, "
        f"max {template.max_tokens} tokens, truncation at the {template.truncation}",
        f"concat_clip: {'yes' if c.concat_clip else 'no'}",
        f"training:    {json.dumps(c.training, sort_keys=True) if c.training else '(untrained)'}",
        f"parameters:  {adapter.num_parameters():,} ({next(adapter.parameters()).dtype})",
    ]
    if adapter.layer_logits is not None:
        import torch

        weights = torch.softmax(adapter.layer_logits.float(), 0).tolist()
        lines.append("layer mix:   " + " ".join(f"{w:.3f}" for w in weights) + "  (embedding first)")
    lines.append("check:       OK (header, config and weights agree)")
    return "\n".join(lines)


_SAFETENSORS_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}


def _file_dtype(header: dict):
    """The dtype the file's weights are stored in, so inspect and upgrade keep it."""
    import torch

    for name, entry in header.items():
        if name != "__metadata__" and entry.get("dtype") in _SAFETENSORS_DTYPES:
            return getattr(torch, _SAFETENSORS_DTYPES[entry["dtype"]])
    return torch.float32


def cmd_inspect(args) -> int:
    from .file_format import load_adapter, read_header

    header = read_header(args.file)  # first: refuses pickles and broken files before anything else reads
    if not (header.get("__metadata__") or {}).get("format"):  # no format of ours: maybe a published adapter
        from .errors import AdapterFileError
        from .foreign import describe_adapter, load_foreign_adapter

        try:
            module = load_foreign_adapter(args.file, dtype=_file_dtype(header))  # names, shapes and data
        except AdapterFileError:
            module = None  # not one either: load_adapter below says what the file is not
        if module is not None:
            print(f"{args.file}: published adapter\n{describe_adapter(module)}\nOK")
            return EXIT_OK
    adapter = load_adapter(args.file, dtype=_file_dtype(header))  # full validation: config, names, shapes, data
    if getattr(adapter, "file_config", None) is not None:  # an ELLA / RouWei module in our format
        from .foreign import describe_adapter

        training = adapter.file_config.training
        print(f"{args.file}: llm-diff-adapter format, {adapter.file_config.architecture['kind']} module trained on "
              f"{adapter.file_config.llm.name or adapter.file_config.llm.architecture}\n{describe_adapter(adapter)}\n"
              f"training: {json.dumps(training, sort_keys=True) if training else '(untrained)'}\nOK")
        return EXIT_OK
    print(describe(args.file, adapter, (header.get("__metadata__") or {}).get("format_version", "?")))
    return EXIT_OK


def cmd_upgrade(args) -> int:
    from .file_format import FORMAT_VERSION, load_adapter, read_header, save_adapter

    header = read_header(args.file)
    version = (header.get("__metadata__") or {}).get("format_version")
    adapter = load_adapter(args.file, dtype=_file_dtype(header))  # applies the migrations
    out = args.out or args.file
    save_adapter(out, adapter, getattr(adapter, "file_config", None))  # an ELLA / RouWei module keeps its file's config
    print(f"wrote {out} at format_version {FORMAT_VERSION} (was {version})")
    return EXIT_OK


# --------------------------------------------------------------------------- entry point


def main(argv=None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    args = build_parser().parse_args(argv)  # exits with EXIT_USAGE on bad usage

    from .errors import AdapterError, AdapterFileError

    try:
        return args.func(args)
    except UsageError as err:
        return _fail(err, EXIT_USAGE)
    except AdapterFileError as err:
        return _fail(err, EXIT_BAD_FILE)
    except AdapterError as err:
        return _fail(err, EXIT_BAD_INPUT)


def _fail(err: Exception, code: int) -> int:
    print("error: " + " ".join(str(err).split()), file=sys.stderr)  # one line, always
    return code


if __name__ == "__main__":
    sys.exit(main())
