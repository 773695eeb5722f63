"""The adapter file: safetensors weights plus the JSON config that rebuilds and validates the module.

Layout (safetensors): an 8-byte little-endian header length, a UTF-8 JSON header naming each
tensor's dtype, shape and byte range, then the raw data. Our header metadata carries
`format = "llm-diff-adapter"`, `format_version` and `config` (AdapterConfig as JSON).

We parse the header ourselves before any library touches the file: that way a pickle or a
PyTorch zip (which can run code when unpickled) is recognised by its first bytes and refused
without ever being opened, and a truncated or foreign file gets a message that says so instead
of a low-level exception. Never pickle; never torch.load.

Older format versions are upgraded on load through MIGRATIONS (version v -> v + 1, config JSON
and tensor names); `python -m adapter upgrade FILE` rewrites a file at the current version.
"""
from __future__ import annotations

import json
import logging
import os
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch

from .config import TARGETS, AdapterConfig, LLMInfo
from .errors import AdapterFileError, AdapterMismatchError, ConfigError
from .fingerprint import fingerprint_version, tokenizer_fingerprint
from .model import LLMDiffAdapter

logger = logging.getLogger(__name__)

FORMAT = "llm-diff-adapter"
FORMAT_VERSION = 1

PathLike = Union[str, os.PathLike]

# safetensors caps the header at 100 MB; anything claiming more is not a real header.
_MAX_HEADER_BYTES = 100 * 1024 * 1024
_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
                "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
_FAMILY_NAMES = {"sd15": "SD1.5", "sd2": "SD2", "sdxl": "SDXL"}


@dataclass(frozen=True)
class Migration:
    """Turns format_version `v` data into format_version `v + 1` (registered as MIGRATIONS[v])."""

    config: Callable[[dict[str, Any]], dict[str, Any]]
    tensors: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] = lambda tensors: tensors


# Empty at version 1. A format change adds MIGRATIONS[1] = Migration(...) and bumps FORMAT_VERSION.
MIGRATIONS: dict[int, Migration] = {}


# ----------------------------------------------------------------------------- reading the header


def read_header(path: PathLike) -> dict[str, Any]:
    """Parse and sanity-check a safetensors header without opening the file with any other reader.

    Refuses (AdapterFileError) a missing file, a pickle / PyTorch file, a corrupt header and a
    truncated file. Returns the header dict (tensor entries plus `__metadata__`).
    """
    path = Path(path)
    if not path.is_file():
        raise AdapterFileError(f"adapter file not found: {path}")
    size = path.stat().st_size
    with open(path, "rb") as f:  # plain bytes: nothing here interprets the content as code
        start = f.read(9)
        # A safetensors header is JSON, so byte 8 is "{". Check that first: the length field's low byte
        # may itself be 0x80 (a header of 128 + 256k bytes), which alone would look like a pickle.
        if start[8:9] != b"{" and (start[:1] == b"\x80" or start[:4] == b"PK\x03\x04"):
            raise AdapterFileError(
                f"{path} is a pickle/PyTorch file; adapters must be .safetensors "
                "(pickle files can run code when opened, so this pack never opens them)"
            )
        start = start[:8]
        f.seek(8)
        if len(start) < 8:
            raise AdapterFileError(f"{path} is only {size} bytes: not a safetensors file (truncated download?)")
        (header_len,) = struct.unpack("<Q", start)
        if header_len < 2 or header_len > _MAX_HEADER_BYTES or header_len > size - 8:
            raise AdapterFileError(
                f"{path} is not a valid safetensors file: its header length field says {header_len} bytes "
                f"but the file has {size} (truncated, or not a safetensors file at all)"
            )
        raw = f.read(header_len)
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
    except (UnicodeDecodeError, ValueError) as err:
        raise AdapterFileError(f"{path} has a corrupt safetensors header ({err}): re-download or re-export it") from None
    _check_tensor_entries(path, header, data_bytes=size - 8 - header_len)
    return header


def _check_tensor_entries(path: Path, header: dict[str, Any], data_bytes: int) -> None:
    """Each entry must be well formed and lie inside the data actually present in the file."""
    needed = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = entry["data_offsets"]
            numel = 1
            for dim in entry["shape"]:
                numel *= int(dim)
            width = _DTYPE_BYTES.get(entry["dtype"])
            if not (0 <= begin <= end) or (width is not None and end - begin != numel * width):
                raise ValueError(f"byte range {begin}..{end} does not fit {entry['dtype']} {entry['shape']}")
        except (KeyError, TypeError, ValueError) as err:
            raise AdapterFileError(f"{path} has a corrupt safetensors header (tensor {name!r}: {err})") from None
        needed = max(needed, end)
    if needed > data_bytes:
        raise AdapterFileError(
            f"{path} is truncated: its header promises {needed} bytes of tensor data but only {data_bytes} "
            "are present; re-download or re-export it"
        )


def _adapter_metadata(path: Path, header: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """(format_version, config dict) from our metadata, refusing foreign and too-new files."""
    metadata = header.get("__metadata__") or {}
    if not isinstance(metadata, dict):
        raise AdapterFileError(f"{path} has a corrupt safetensors header (__metadata__ is not an object)")
    found = metadata.get("format")
    if found != FORMAT:
        raise AdapterFileError(
            f"{path} is not an LLM Diff Adapter file (format={found if found is not None else 'missing'}); "
            "it is a safetensors file of another kind (a checkpoint, LoRA or text encoder?)"
        )
    try:
        version = int(metadata.get("format_version", ""))
    except ValueError:
        raise AdapterFileError(f"{path} has an invalid format_version {metadata.get('format_version')!r}") from None
    if version > FORMAT_VERSION:
        raise AdapterFileError(
            f"{path} uses adapter format_version {version} but this pack reads up to {FORMAT_VERSION}: update the pack"
        )
    try:
        config = json.loads(metadata.get("config", ""))
        if not isinstance(config, dict):
            raise ValueError("not a JSON object")
    except ValueError as err:
        raise AdapterFileError(f"{path} has a corrupt adapter config in its metadata ({err})") from None
    return version, config


def _migration_steps(path: Path, version: int) -> list[Migration]:
    steps = []
    for v in range(version, FORMAT_VERSION):
        if v not in MIGRATIONS:
            raise AdapterFileError(
                f"{path} uses adapter format_version {version} and this pack has no migration from version {v} "
                f"to {v + 1}: convert it with `python -m adapter upgrade {path}` using a pack release that still "
                f"reads format_version {version}"
            )
        steps.append(MIGRATIONS[v])
    return steps


def _parse_config(path: Path, data: dict[str, Any]) -> AdapterConfig:
    try:
        return AdapterConfig.from_dict(data)
    except ConfigError as err:
        raise AdapterFileError(f"{path} has an invalid adapter config: {err}") from None


def read_adapter_config(path: PathLike) -> AdapterConfig:
    """The AdapterConfig of an adapter file, read from its header only (upgraded if older)."""
    path = Path(path)
    version, data = _adapter_metadata(path, read_header(path))
    for step in _migration_steps(path, version):
        data = step.config(data)
    return _parse_config(path, data)


# ----------------------------------------------------------------------------- saving and loading


def _check_state_dict(path: PathLike, expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor]) -> None:
    """Names and shapes must match the module the config describes exactly; say which do not."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = [f"{k} {tuple(found[k].shape)} (expected {tuple(expected[k].shape)})"
             for k in sorted(set(expected) & set(found)) if found[k].shape != expected[k].shape]
    problems = []
    if missing:
        problems.append(f"missing tensors {_short(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors {_short(unexpected)}")
    if wrong:
        problems.append(f"wrong shapes {_short(wrong)}")
    if problems:
        raise AdapterFileError(
            f"{path}: the weights do not match the architecture in its config ({'; '.join(problems)}); "
            "the file was edited or written by a broken exporter: re-export it"
        )


def _short(items: list[str], limit: int = 5) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def build_module(config: AdapterConfig) -> torch.nn.Module:
    """The module a config describes, with `.config` set: our LLMDiffAdapter, or, when `config.architecture` is set,
    an ELLA / RouWei module (adapter/foreign/scratch.py) whose `.config` is its ForeignConfig."""
    if config.architecture is None:
        return LLMDiffAdapter(config)
    from .foreign.scratch import build, from_adapter_config

    try:
        return build(from_adapter_config(config))
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:  # sizes the constructor cannot build
        raise ConfigError(f"adapter config 'architecture': {err}") from None


def _expected_state_dict(config: AdapterConfig) -> dict[str, torch.Tensor]:
    """Names and shapes of the module a config describes, built on the meta device (no memory, no init cost)."""
    with torch.device("meta"):
        return build_module(config).state_dict()


def save_adapter(path: PathLike, adapter: LLMDiffAdapter, config: Optional[AdapterConfig] = None) -> Path:
    """Write `adapter` (weights + config + format metadata) to a .safetensors file, atomically.

    `config` defaults to `adapter.config`; pass one to add provenance (it must describe the same
    architecture: checked, so a saved file always loads). The file appears complete or not at all.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise AdapterFileError(f"adapter files must end in .safetensors (the loaders list only those), got {path.name}")
    config = config if config is not None else adapter.config
    config.validate()
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in adapter.state_dict().items()}
    _check_state_dict(path, _expected_state_dict(config), tensors)
    metadata = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "config": json.dumps(config.to_dict())}

    path.parent.mkdir(parents=True, exist_ok=True)
    # Temp file in the same folder, then os.replace: readers never see a half-written adapter.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_adapter(path: PathLike, device: Union[str, torch.device] = "cpu", dtype: torch.dtype = torch.float32) -> LLMDiffAdapter:
    """Rebuild the adapter a file describes and load its weights strictly; `.config` is attached (a file with an
    `architecture` gives that ELLA / RouWei module, whose `.config` is an adapter.foreign ForeignConfig)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    version, data = _adapter_metadata(path, read_header(path))  # refuses pickles before anything else reads
    steps = _migration_steps(path, version)
    for step in steps:
        data = step.config(data)
    config = _parse_config(path, data)
    try:
        tensors = load_file(path, device=str(torch.device(device)))
    except (SafetensorError, OSError) as err:
        raise AdapterFileError(f"{path} could not be read as safetensors ({err}): re-download or re-export it") from None
    for step in steps:
        tensors = step.tensors(tensors)

    try:
        with torch.device("meta"):  # no random init: every tensor comes from the file
            adapter = build_module(config)
    except ConfigError as err:
        raise AdapterFileError(f"{path} has an invalid adapter config: {err}") from None
    _check_state_dict(path, adapter.state_dict(), tensors)
    adapter.load_state_dict(tensors, strict=True, assign=True)
    if config.architecture is not None:  # `.config` is its ForeignConfig; the file's own config (provenance too) stays here
        adapter.file_config = config
    return adapter.to(device=device, dtype=dtype).eval()


# ----------------------------------------------------------------------------- validation against the graph


def check_llm_matches(config: AdapterConfig, llm_info: LLMInfo, tokenizer=None) -> None:
    """Raise AdapterMismatchError naming both sides if the LLM is not the one the adapter was built for.

    Hidden size, layer count and tokenizer fingerprint must match (they decide what the adapter
    reads). A different architecture name alone only warns: renamed classes and merged
    fine-tunes of the same model keep all three. `tokenizer` (the LLM's) lets an adapter that
    recorded an older fingerprint version be checked at that version.
    """
    want = config.llm
    problems = []
    if want.hidden_size != llm_info.hidden_size:
        problems.append(f"hidden size {want.hidden_size} vs {llm_info.hidden_size}")
    if want.num_layers != llm_info.num_layers:
        problems.append(f"{want.num_layers} vs {llm_info.num_layers} layers")
    if not _same_tokenizer(want.tokenizer_fingerprint, llm_info.tokenizer_fingerprint, tokenizer):
        problem = f"tokenizer {want.tokenizer_fingerprint} vs {llm_info.tokenizer_fingerprint}"
        if fingerprint_version(want.tokenizer_fingerprint) == 1:
            problem += (" [the adapter records a version-1 fingerprint, which also counts the vocabulary size and "
                        "the EOS/UNK ids that tokenizer copies such as ComfyUI's change; with the LLM's Hugging "
                        "Face folder it validates]")
        problems.append(problem)
    if problems:
        raise AdapterMismatchError(
            f"this adapter was built for {_describe(want)} but the LLM is {_describe(llm_info)} "
            f"({'; '.join(problems)}): load the LLM the adapter was trained for, or train an adapter for this LLM"
        )
    if want.architecture != llm_info.architecture:
        logger.warning("adapter was built for %s, the LLM is %s; sizes and tokenizer match, so going ahead",
                       want.architecture, llm_info.architecture)


def _same_tokenizer(want: str, have: str, tokenizer) -> bool:
    """Equal fingerprints; or, for an adapter that recorded an older version, the tokenizer's at that version."""
    if want == have:
        return True
    version = fingerprint_version(want)
    if tokenizer is None or version is None or fingerprint_version(have) == version:
        return False
    return tokenizer_fingerprint(tokenizer, version) == want


def _describe(info: LLMInfo) -> str:
    name = f"{info.name} " if info.name else ""
    return f"{name}({info.architecture}, hidden {info.hidden_size}, {info.num_layers} layers)"


def _family_of(context_dim: int) -> str:
    for family, spec in TARGETS.items():
        if spec.context_dim == context_dim:
            return family
    return "custom"


def check_context_dim(config: AdapterConfig, context_dim: int, pooled_dim: Optional[int], where: str) -> None:
    """Raise AdapterMismatchError if the UNet side (`where`, e.g. "the connected CLIP") needs other widths.

    `pooled_dim` is what that side expects for the pooled vector (None: it takes none, or it is
    unknown). An adapter's extra pooled head is harmless; a missing or wrongly sized one is not.
    """
    target = config.target
    if target.context_dim != context_dim:
        family = _family_of(context_dim)
        advice = (f"use an adapter trained for {family}" if family != "custom"
                  else f"use an adapter built with --target custom --context-dim {context_dim}")
        raise AdapterMismatchError(
            f"adapter makes {target.context_dim}-wide {_FAMILY_NAMES.get(target.family, target.family)} context "
            f"but {where} gives {context_dim} ({_FAMILY_NAMES.get(family, 'no known family')}): {advice}"
        )
    if pooled_dim is not None and target.pooled_dim != pooled_dim:
        have = f"a {target.pooled_dim}-wide pooled vector" if target.pooled_dim else "no pooled vector"
        raise AdapterMismatchError(
            f"adapter makes {have} but {where} needs a {pooled_dim}-wide one: use an adapter trained for "
            f"{'sdxl' if pooled_dim == TARGETS['sdxl'].pooled_dim else f'--target custom --pooled-dim {pooled_dim}'}"
        )
