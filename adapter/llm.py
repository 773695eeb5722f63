"""Load a decoder-only LLM from a Hugging Face folder and turn prompts into the states of every block.

The adapter reads `[B, L+1, T, H]`: the embedding output and the residual stream after each of
the L blocks, all BEFORE the final norm. transformers' `output_hidden_states` gives L+1 entries
but its last one has the final norm applied (it is tied to `last_hidden_state`), so run_llm
replaces it with the input of the final norm, captured by a forward pre-hook. That makes every
entry the same kind of quantity (raw residual stream), which the adapter's per-layer RMS norm
expects, and it is what any other loader (ComfyUI's `intermediate_output="all"`) can reproduce.

The model is loaded through AutoModel, i.e. WITHOUT its LM head: for short prompts the
vocabulary-sized logits would cost about as much as the whole tiny forward, and we never use them.
For multimodal checkpoints (e.g. Gemma 3 4B+, `Gemma3ForConditionalGeneration`) the text
decoder (`.language_model`) is kept and the rest dropped after loading.

The LLM is frozen everywhere (the adapter learns around it): parameters have requires_grad off,
so no autograd graph is built through it; whether to also use no_grad or inference_mode is the
caller's choice (the trainer may need tensors usable in autograd, which inference_mode forbids).
Everything is offline: local_files_only=True, safetensors only (never pickle checkpoints).
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from .config import LLMInfo, TemplateConfig
from .errors import LLMLoadError
from .fingerprint import tokenizer_fingerprint
from .quantization import bitsandbytes_config
from .template import PromptInfo, tokenize_prompts

__all__ = ["DecoderParts", "EncodedPrompts", "LoadedLLM", "encode_prompts", "find_decoder_parts", "llm_info", "load_llm", "run_llm"]

logger = logging.getLogger(__name__)

# Families tested with tiny random models (devkit/tiny_models.py). Other decoder-only
# model types load too when their structure is recognised, with a warning.
TESTED_MODEL_TYPES = frozenset({"qwen2", "qwen3", "llama", "gemma2", "gemma3", "gemma3_text"})

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", "tiktoken.model")
_PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt")
# Where decoder-only models in transformers keep their block stack and final norm.
_LAYER_ATTRS = ("layers", "h", "blocks", "decoder.layers")
_NORM_ATTRS = ("norm", "ln_f", "final_layernorm", "final_norm", "norm_f")


class DecoderParts(NamedTuple):
    """The pieces of a decoder-only model that the pre-norm contract refers to."""

    embed: nn.Module  # token embedding
    layers: nn.ModuleList  # the L transformer blocks, in order
    norm: nn.Module  # the final norm (its input is the last pre-norm state)


@dataclass
class LoadedLLM:
    model: nn.Module  # the decoder without its LM head, in eval mode, frozen
    tokenizer: object  # a transformers fast tokenizer
    info: LLMInfo
    device: torch.device
    dtype: torch.dtype

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[B, L+1, T, H] pre-final-norm states (run_llm). The backend contract: encode_prompts calls only
        this, `.tokenizer` and `.device`, so another implementation of the same LLM (ComfyUI's, in
        nodes/comfy_llm.py) plugs in by providing them."""
        return run_llm(self.model, input_ids, attention_mask)


@dataclass
class EncodedPrompts:
    hidden_states: torch.Tensor  # [B, L+1, T, H] on the LLM's device, in its dtype
    attention_mask: torch.Tensor  # int64 [B, T], 1 = real token
    infos: list[PromptInfo]


def _attr_path(module: nn.Module, dotted: str):
    for name in dotted.split("."):
        module = getattr(module, name, None)
        if module is None:
            return None
    return module


def text_decoder(model: nn.Module) -> nn.Module:
    """The text decoder inside `model`: a *ForCausalLM's base model (never run the LM head) and a
    multimodal model's `.language_model` (Gemma 3 4B+), so callers may pass either."""
    while True:
        inner = getattr(model, "model", None)
        if getattr(model, "lm_head", None) is not None and isinstance(inner, nn.Module):
            model = inner
        elif isinstance(getattr(model, "language_model", None), nn.Module):
            model = model.language_model
        else:
            return model


def find_decoder_parts(model: nn.Module) -> DecoderParts:
    """Locate the embedding, the block stack and the final norm of a decoder-only model.

    Raises LLMLoadError when the model does not look like a stack of blocks followed by a final
    norm (an encoder, an encoder-decoder, or an unknown layout).
    """
    model = text_decoder(model)
    layers = next((m for m in (_attr_path(model, a) for a in _LAYER_ATTRS) if isinstance(m, nn.ModuleList)), None)
    norm = next((m for m in (_attr_path(model, a) for a in _NORM_ATTRS) if isinstance(m, nn.Module)), None)
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if layers is None or norm is None or embed is None or len(layers) == 0:
        raise LLMLoadError(
            f"{type(model).__name__} is not a supported decoder-only LLM: it has no block stack "
            f"({'/'.join(_LAYER_ATTRS)}) followed by a final norm ({'/'.join(_NORM_ATTRS)}); "
            "use a Qwen2/2.5/3, Llama 2/3 or Gemma 2/3 folder"
        )
    return DecoderParts(embed, layers, norm)


def run_llm(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, L+1, T, H]: the embedding output and the residual stream after each block, before the final norm."""
    model = text_decoder(model)
    parts = find_decoder_parts(model)
    norm_inputs: list[torch.Tensor] = []

    def grab_norm_input(module, args, kwargs):
        norm_inputs.append(args[0] if args else next(iter(kwargs.values())))

    handle = parts.norm.register_forward_pre_hook(grab_norm_input, with_kwargs=True)
    try:
        out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, use_cache=False,
                    return_dict=True)
    finally:
        handle.remove()
    states = list(out.hidden_states)
    if len(norm_inputs) != 1 or len(states) != len(parts.layers) + 1:
        raise LLMLoadError(
            f"{type(model).__name__} ran its final norm {len(norm_inputs)} times and returned {len(states)} hidden "
            f"states for {len(parts.layers)} blocks; its layout is not supported"
        )
    states[-1] = norm_inputs[0]  # transformers' last entry is after the final norm: use the norm's input
    return torch.stack(states, dim=1)


def encode_prompts(llm: LoadedLLM, template: TemplateConfig, prompts: list[str]) -> EncodedPrompts:
    """Template + tokenize + run the LLM: the states the adapter reads, with the mask and per-prompt info."""
    tokens = tokenize_prompts(llm.tokenizer, template, prompts)
    input_ids = tokens.input_ids.to(llm.device)
    attention_mask = tokens.attention_mask.to(llm.device)
    hidden_states = llm.hidden_states(input_ids, attention_mask)
    return EncodedPrompts(hidden_states, attention_mask, tokens.infos)


def _check_folder(path: Path) -> None:
    """Fail early, naming what is missing, instead of deep inside transformers."""
    if not path.exists():
        raise LLMLoadError(f"LLM folder {path} does not exist; put a Hugging Face-format model folder there "
                           "(config.json, *.safetensors, tokenizer files)")
    if not path.is_dir():
        raise LLMLoadError(f"{path} is a file; an LLM must be a Hugging Face-format folder "
                           "(config.json, *.safetensors, tokenizer files)")
    if not (path / "config.json").is_file():
        raise LLMLoadError(f"LLM folder {path} has no config.json; copy the model's whole Hugging Face folder")
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (ValueError, KeyError, AttributeError) as err:
            raise LLMLoadError(f"{index} is not a valid safetensors index ({err}); copy it again") from None
        missing = [name for name in shards if not (path / name).is_file()]
        if missing:
            raise LLMLoadError(f"LLM folder {path} is incomplete: its index lists {len(shards)} weight shards but "
                               f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing; finish copying")
    elif not any(path.glob("*.safetensors")):
        pickled = sorted(p.name for pattern in _PICKLE_WEIGHTS for p in path.glob(pattern))
        if pickled:
            raise LLMLoadError(f"LLM folder {path} has only pickle weights ({', '.join(pickled)}); they are not "
                               "loaded for safety: use the model's safetensors release or convert it to safetensors")
        raise LLMLoadError(f"LLM folder {path} has no weights (*.safetensors); copy the model's weight files")
    if not any((path / name).is_file() for name in _TOKENIZER_FILES):
        raise LLMLoadError(f"LLM folder {path} has no tokenizer (one of {', '.join(_TOKENIZER_FILES)}); copy the "
                           "tokenizer files from the model's release")


class _LoadReportCapture(logging.Filter):
    """Holds back transformers' load report while we load a causal LM's folder without its LM head.

    The report lists `lm_head.weight | UNEXPECTED` for every such folder, which reads like an error to a
    user although dropping the head is the point (only hidden states are used). After loading, `explain`
    logs one plain line when the head is all that was left out, and the full report otherwise
    (missing or mismatched weights are real problems).
    """

    def __enter__(self) -> "_LoadReportCapture":
        self.records: list[logging.LogRecord] = []
        self._logger = logging.getLogger("transformers.modeling_utils")
        self._logger.addFilter(self)
        return self

    def __exit__(self, *exc) -> None:
        self._logger.removeFilter(self)
        if exc[0] is not None:  # loading failed: the report may say why
            self._release()

    def filter(self, record: logging.LogRecord) -> bool:
        if "LOAD REPORT" in record.getMessage():
            self.records.append(record)
            return False
        return True

    def _release(self) -> None:
        for record in self.records:
            logger.warning("%s", record.getMessage())

    def explain(self, path: Path, loading_info: dict) -> None:
        unexpected = set(loading_info.get("unexpected_keys") or ())
        head = {k for k in unexpected if k.split(".", 1)[0] in ("lm_head", "output", "embed_out")}
        if unexpected - head or loading_info.get("missing_keys") or loading_info.get("mismatched_keys"):
            self._release()
        elif head:
            logger.info("%s: LM head weights (%s) not loaded: the adapter reads the hidden states only",
                        path.name, ", ".join(sorted(head)))


def load_llm(path, dtype: torch.dtype = torch.float32, device="cpu", trust_remote_code: bool = False,
             quantization: str = "none") -> LoadedLLM:
    """Load a decoder-only LLM folder offline, without its LM head; raises LLMLoadError naming the problem.

    A T5 / UMT5 / T5Gemma folder loads as a text encoder instead (adapter.foreign.text.LoadedEncoder: its
    encoder half, for the public adapters that read it); our own adapters refuse it with a clear message.

    quantization "8bit" / "4bit": bitsandbytes on a CUDA device (adapter/quantization.py); the model is
    then loaded straight onto `device` (bitsandbytes quantises while loading) and `dtype` is the dtype
    of the other weights and the 4-bit compute dtype.
    """
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    path = Path(os.fspath(path)).expanduser()
    device = torch.device(device)
    if device.type == "cpu" and dtype == torch.float16:
        raise LLMLoadError("float16 does not run on a CPU; load the LLM in float32 (or bfloat16) there")
    quantization_config = bitsandbytes_config(quantization, device, dtype)
    quantized = {} if quantization_config is None else dict(quantization_config=quantization_config, device_map={"": device})
    _check_folder(path)
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    except (ValueError, KeyError, OSError) as err:
        raise LLMLoadError(f"cannot read {path / 'config.json'}: {err}. An unknown model_type needs a newer "
                           "transformers (or trust_remote_code for custom code)") from None
    if getattr(config, "is_encoder_decoder", False):
        from .foreign.text import ENCODER_MODEL_TYPES, load_text_encoder

        if config.model_type in ENCODER_MODEL_TYPES:
            # T5 / T5Gemma: the text encoders of the public adapters (ELLA, RouWei-T5Gemma); encoder half only.
            if quantization != "none":
                raise LLMLoadError(f"{path.name} is a {config.model_type} text encoder: 8/4-bit loading is for decoder "
                                   "LLMs; load it with quantization none (dtype bf16/fp16 halves its memory)")
            return load_text_encoder(path, dtype=dtype, device=device)
        raise LLMLoadError(f"{path.name} is an encoder-decoder model ({config.model_type}); the adapter needs a "
                           "decoder-only LLM (Qwen2/2.5/3, Llama 2/3, Gemma 2/3)")
    if config.model_type not in TESTED_MODEL_TYPES:
        logger.warning("LLM model_type %r is untested with the adapter; loading it as a decoder-only model",
                       config.model_type)
    try:
        with _LoadReportCapture() as report:
            model, loading_info = AutoModel.from_pretrained(
                path, config=config, dtype=dtype, local_files_only=True, trust_remote_code=trust_remote_code,
                use_safetensors=True, output_loading_info=True, **quantized)
        report.explain(path, loading_info)
    except Exception as err:  # corrupt or truncated safetensors, shape mismatches, ...: say which folder
        raise LLMLoadError(f"cannot load the LLM weights in {path}: {err}; copy the weight files again") from err
    built_class = type(model).__name__  # what architecture reports when config.json names none
    model = text_decoder(model)  # multimodal: keep the text decoder only (the vision tower is dropped)
    parts = find_decoder_parts(model)
    if not quantized:  # a quantised model is already on `device` (and bitsandbytes 8-bit refuses .to)
        model.to(device)
    model.eval().requires_grad_(False)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    except Exception as err:
        raise LLMLoadError(f"cannot load the tokenizer in {path}: {err}; copy the tokenizer files again") from err
    info = llm_info(config, tokenizer, path.name, built_class=built_class, num_layers=len(parts.layers))
    return LoadedLLM(model=model, tokenizer=tokenizer, info=info, device=device, dtype=dtype)


def llm_info(config, tokenizer, name: str, *, built_class: str | None = None, num_layers: int | None = None) -> LLMInfo:
    """What an adapter records about its LLM, from the folder's config and tokenizer: load_llm passes the class
    transformers built and the blocks it found; `python -m adapter init` reads no weights and passes neither
    (then the class AutoModel would build, and the config's block count)."""
    architecture = (config.architectures or [built_class])[0]
    if architecture is None:
        from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

        architecture = MODEL_MAPPING_NAMES.get(config.model_type, config.model_type)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config  # the decoder's, also multimodal
    return LLMInfo(architecture=architecture, model_type=config.model_type, hidden_size=int(text.hidden_size),
                   num_layers=int(text.num_hidden_layers if num_layers is None else num_layers),
                   tokenizer_fingerprint=tokenizer_fingerprint(tokenizer), name=name)
