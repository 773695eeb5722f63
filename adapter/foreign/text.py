"""The text sides of the public adapters: which model, which tokens, which states.

- RouWei-Gemma: a decoder LLM (Gemma-3-1B-it) over its chat template [system, user] with the
  generation prompt; the LAST hidden state after the final norm (transformers' `hidden_states[-1]`,
  not the pre-norm states our own adapters read), in fp32, minus the first `skip_first` = 27 tokens;
  the adapter pads or cuts to 512 with a mask.
  With Gemma 3's template the sequence starts `<bos><start_of_turn>user\n` + system text + `\n\n` +
  the prompt (Gemma 3 folds the system turn into the first user turn); 27 is meant to cover that
  prefix for the default system text, so the adapter sees the prompt, `<end_of_turn>\n` and
  `<start_of_turn>model\n`. `GemmaChatStates.prefix_tokens` reports the real prefix length with
  the tokenizer at hand, so a changed system text that no longer fits 27 is visible in `info`.
- RouWei-T5Gemma: a T5Gemma ENCODER's `last_hidden_state` of `text + "<eos>"`, padded to 512, the
  mask given to the encoder and to the adapter.
- ELLA: a T5 ENCODER's `last_hidden_state` (Flan-T5-XL), 128 tokens padded (the reference's
  default), or unpadded ("flexible") for short prompts; the adapter attends to every position.
- "template": a module of these architectures trained from scratch on a decoder LLM (`--arch`), or
  kept in our file format: the prompt through the prompt template recorded in its file (ours:
  adapter/template.py, the same tokens our own adapters read), the final-norm last hidden state of
  every token of that sequence, with the padding mask.

Encoders load from a local Hugging Face folder (config.json with model_type t5 / umt5 / t5gemma,
safetensors weights, tokenizer files), offline.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple

import torch

from ..config import LLMInfo
from ..errors import AdapterMismatchError, LLMLoadError
from ..fingerprint import tokenizer_fingerprint

log = logging.getLogger(__name__)

ROUWEI_SYSTEM_PROMPT = ("You are expert in understanding of user prompts for image generations. "
                        "Create an image according to the prompt from user.")
ENCODER_MODEL_TYPES = {"t5": "T5EncoderModel", "umt5": "UMT5EncoderModel", "mt5": "MT5EncoderModel",
                       "t5gemma": "T5GemmaEncoderModel"}
TEXT_ENCODERS = ("gemma_chat", "t5gemma", "t5", "any", "template")


@dataclass(frozen=True)
class TextSide:
    """What an adapter needs from the text model (the reference settings; the node's advanced inputs override some)."""

    encoder: str  # "gemma_chat" (decoder LLM + chat template) | "t5gemma" | "t5" (encoders) | "any": whichever is connected
    # | "template": decoder LLM through `template` (our prompt template)
    max_length: int  # tokens the adapter reads (RouWei pads/cuts to it; T5 sides pad to it unless flexible)
    skip_first: int = 0  # gemma_chat: leading tokens dropped
    system_prompt: str = ""  # gemma_chat: the system turn
    pad: bool = True  # encoders: pad to max_length ("max_length" padding) rather than to the prompt ("flexible")
    suffix: str = ""  # text appended to the prompt (T5Gemma: "<eos>")
    # Encoders: whether the adapter gets the padding mask (RouWei-T5Gemma) or reads every position it is given,
    # the encoder's padding included (ELLA, whose reference passes no mask).
    mask_adapter: bool = True
    # "template" only: the TemplateConfig as JSON (a string keeps the side hashable: it is part of the encode cache key)
    template: str = ""

    def describe(self) -> str:
        if self.encoder == "template":
            return (f"decoder LLM through the recorded prompt template, final-norm last hidden state, "
                    f"up to {self.max_length} prompt tokens")
        if self.encoder in ("gemma_chat", "any"):
            return (f"{'decoder LLM' if self.encoder == 'any' else 'Gemma'} chat template, final-norm last hidden state, "
                    f"skip_first {self.skip_first}, up to {self.max_length} tokens")
        name = "T5Gemma encoder" if self.encoder == "t5gemma" else "T5 encoder"
        return f"{name} last_hidden_state, {'padded to' if self.pad else 'unpadded, at most'} {self.max_length} tokens"


ROUWEI_GEMMA_TEXT = TextSide("gemma_chat", 512, skip_first=27, system_prompt=ROUWEI_SYSTEM_PROMPT)
ROUWEI_T5GEMMA_TEXT = TextSide("t5gemma", 512, pad=True, suffix="<eos>")
ELLA_TEXT = TextSide("t5", 128, pad=True, mask_adapter=False)


class TextStates(NamedTuple):
    states: torch.Tensor  # [B, T, H] fp32
    mask: torch.Tensor  # [B, T] int64, 1 = real token
    tokens: list  # per prompt: tokens the adapter reads (real ones)
    dropped: list  # per prompt: tokens cut at the end (over max_length)
    prefix_tokens: int  # gemma_chat: template + system tokens before the prompt (for the skip_first check); else 0


@dataclass
class LoadedEncoder:
    """A T5 / T5Gemma encoder: the same fields as adapter.LoadedLLM, but it has no decoder layer states."""

    model: torch.nn.Module
    tokenizer: object
    info: LLMInfo
    device: torch.device
    dtype: torch.dtype
    is_encoder = True

    def hidden_states(self, input_ids, attention_mask):
        raise AdapterMismatchError(
            f"{self.info.name} is a text encoder ({self.info.model_type}); LLM Diff Adapters read every layer of a "
            "decoder-only LLM. Use it with an ELLA or RouWei-T5Gemma adapter, or load the decoder LLM your adapter was trained with"
        )

    def last_hidden_state(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def template_side(template) -> TextSide:
    """The "template" text side for an adapter.TemplateConfig (a decoder LLM's states through our prompt template)."""
    import dataclasses
    import json

    return TextSide("template", template.max_tokens, template=json.dumps(dataclasses.asdict(template), sort_keys=True))


def side_template(side: TextSide):
    """The adapter.TemplateConfig a "template" side holds."""
    import json

    from ..config import TemplateConfig

    return TemplateConfig(**json.loads(side.template))


def is_encoder(llm) -> bool:
    return bool(getattr(llm, "is_encoder", False))


def encoder_kind(llm) -> str:
    """The TextSide.encoder value an LLM handle can serve."""
    if is_encoder(llm):
        return "t5gemma" if llm.info.model_type == "t5gemma" else "t5"
    return "gemma_chat"


def load_text_encoder(path, dtype: torch.dtype = torch.float32, device="cpu") -> LoadedEncoder:
    """A T5 / UMT5 / T5Gemma encoder (the decoder half is never loaded) from a local folder, offline."""
    import transformers
    from transformers import AutoConfig, AutoTokenizer

    from ..llm import _check_folder

    path = Path(os.fspath(path)).expanduser()
    _check_folder(path)
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    class_name = ENCODER_MODEL_TYPES.get(config.model_type)
    if class_name is None:
        raise LLMLoadError(f"{path.name} is a {config.model_type} model, not a T5 / T5Gemma encoder")
    if config.model_type == "t5gemma":
        config.is_encoder_decoder = False  # T5GemmaEncoderModel builds (and loads) the encoder half only
    try:
        model = getattr(transformers, class_name).from_pretrained(path, config=config, dtype=dtype, local_files_only=True,
                                                                  use_safetensors=True)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as err:
        raise LLMLoadError(f"cannot load the {config.model_type} encoder in {path}: {err}; copy the folder again") from err
    model.to(device).eval().requires_grad_(False)
    encoder_config = getattr(config, "encoder", None) or config  # T5Gemma nests the encoder's sizes
    hidden = int(getattr(encoder_config, "hidden_size", None) or getattr(encoder_config, "d_model"))
    layers = int(getattr(encoder_config, "num_hidden_layers", None) or getattr(encoder_config, "num_layers"))
    info = LLMInfo(architecture=class_name, model_type=config.model_type, hidden_size=hidden, num_layers=layers,
                   tokenizer_fingerprint=tokenizer_fingerprint(tokenizer), name=path.name)
    return LoadedEncoder(model=model, tokenizer=tokenizer, info=info, device=torch.device(device), dtype=dtype)


def is_encoder_folder(path) -> bool:
    """Does config.json in `path` name an encoder-decoder family we load as an encoder?"""
    import json

    try:
        config = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return config.get("model_type") in ENCODER_MODEL_TYPES


def check_text_side(side: TextSide, llm, adapter_name: str) -> None:
    """AdapterMismatchError naming both sides when the LLM cannot produce what the adapter reads."""
    have = encoder_kind(llm)
    if side.encoder == "any" or (side.encoder == "template" and have == "gemma_chat"):
        return
    if side.encoder == have:
        return
    wants = {"gemma_chat": "a decoder LLM (Gemma-3-1B-it) loaded from its folder",
             "template": "the decoder LLM it was trained with, loaded from its folder",
             "t5gemma": "a T5Gemma encoder folder", "t5": "a T5 encoder folder (Flan-T5-XL)"}[side.encoder]
    has = {"gemma_chat": f"the decoder LLM {llm.info.name!r} ({llm.info.model_type})",
           "t5gemma": f"the T5Gemma encoder {llm.info.name!r}", "t5": f"the T5 encoder {llm.info.name!r} ({llm.info.model_type})"}[have]
    raise AdapterMismatchError(f"adapter {adapter_name!r} needs {wants}, but {has} is connected: load the text model "
                               "the adapter was trained with in Load LLM")


def check_width(width: int, llm, adapter_name: str) -> None:
    if llm.info.hidden_size != width:
        raise AdapterMismatchError(
            f"adapter {adapter_name!r} reads {width}-wide text states, but {llm.info.name!r} ({llm.info.model_type}) "
            f"gives {llm.info.hidden_size}: load the text model the adapter was trained with"
        )


def encode_text(llm, side: TextSide, prompts: list[str]) -> TextStates:
    """The states the adapter reads for `prompts` (one forward of the text model)."""
    if is_encoder(llm):
        return _encoder_states(llm, side, prompts)
    if side.encoder == "template":
        return _template_states(llm, side, prompts)
    return _gemma_chat_states(llm, side, prompts)


def _template_states(llm, side: TextSide, prompts: list[str]) -> TextStates:
    """Our prompt template's tokens (adapter.template.tokenize_prompts, right-padded, with its truncation), then
    the decoder's final-norm last hidden state: what RouWei reads from Gemma, through our template."""
    from ..llm import text_decoder
    from ..template import tokenize_prompts

    tokens = tokenize_prompts(llm.tokenizer, side_template(side), prompts)
    ids, mask = tokens.input_ids.to(llm.device), tokens.attention_mask.to(llm.device)
    states = text_decoder(llm.model)(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state.float()
    kept = [info.prompt_tokens - info.truncated_tokens for info in tokens.infos]
    return TextStates(states, mask.long(), kept, [info.truncated_tokens for info in tokens.infos], 0)


def _encoder_states(llm: LoadedEncoder, side: TextSide, prompts: list[str]) -> TextStates:
    texts = [p + side.suffix for p in prompts]
    full = llm.tokenizer(texts, padding=False, truncation=False)["input_ids"]
    batch = llm.tokenizer(texts, return_tensors="pt", truncation=True, max_length=side.max_length,
                          padding="max_length" if side.pad else "longest")
    ids, mask = batch["input_ids"].to(llm.device), batch["attention_mask"].to(llm.device)
    states = llm.last_hidden_state(ids, mask).float()
    if not side.mask_adapter:
        mask = torch.ones_like(mask)  # the adapter reads every position, as its reference does
    tokens = [min(len(f), side.max_length) for f in full]
    return TextStates(states, mask.long(), tokens, [max(0, len(f) - side.max_length) for f in full], 0)


def _gemma_chat_states(llm, side: TextSide, prompts: list[str]) -> TextStates:
    """One prompt at a time, unpadded: right padding would not change a causal LLM's states, but one
    prompt per forward is what the reference does and keeps the path free of padding questions."""
    from ..llm import text_decoder

    rows, tokens, dropped = [], [], []
    tokenizer = llm.tokenizer
    prefix = _prefix_tokens(tokenizer, side.system_prompt)
    for prompt in prompts:
        messages = ([{"role": "system", "content": side.system_prompt}] if side.system_prompt else []) + [
            {"role": "user", "content": prompt}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        ids = torch.tensor([list(ids)], device=llm.device)
        out = text_decoder(llm.model)(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
        states = out.last_hidden_state.float()[:, side.skip_first:]  # after the final norm
        dropped.append(max(0, states.shape[1] - side.max_length))
        states = states[:, : side.max_length]
        tokens.append(states.shape[1])
        rows.append(states)
    width = max(r.shape[1] for r in rows)
    states = torch.cat([torch.nn.functional.pad(r, (0, 0, 0, width - r.shape[1])) for r in rows])
    mask = torch.tensor([[1] * n + [0] * (width - n) for n in tokens], device=states.device)
    return TextStates(states, mask, tokens, dropped, prefix)


def _prefix_tokens(tokenizer, system_prompt: str) -> int:
    """Tokens before the user's text in the chat template (found by rendering two different prompts)."""
    def render(text):
        messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [{"role": "user", "content": text}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)

    try:
        a, b = render("a"), render("b")
    except Exception:  # a tokenizer without a chat template: the caller's skip_first stands alone
        return 0
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def with_overrides(side: TextSide, **values) -> TextSide:
    """`side` with the node's advanced inputs applied (None = keep the reference value)."""
    return replace(side, **{k: v for k, v in values.items() if v is not None})


def check_pairing(config, llm, adapter_name: str, llm_name: str = "") -> None:
    """Any adapter (ours or a published one) against the loaded text model; AdapterMismatchError naming both.

    Ours read every layer of the decoder LLM they were trained with (file_format.check_llm_matches);
    a published adapter needs its kind of text model (check_text_side) of the right width, and, when its file
    records the text model it was trained with (our format), that very model.
    """
    from .layouts import ForeignConfig

    if isinstance(config, ForeignConfig):
        check_text_side(config.text, llm, adapter_name)
        check_width(config.arch.llm_dim if config.kind == "rouwei" else config.arch.input_dim, llm, adapter_name)
        if config.llm is not None:
            from ..file_format import check_llm_matches

            check_llm_matches(config, llm.info, llm.tokenizer)
        return
    if is_encoder(llm):
        raise AdapterMismatchError(
            f"adapter {adapter_name!r} reads every layer of the decoder-only LLM it was trained with "
            f"({config.llm.architecture}, hidden {config.llm.hidden_size}), but {llm_name or llm.info.name!r} is a "
            f"{llm.info.model_type} text encoder: load that LLM's folder in Load LLM (T5 encoders are for ELLA / RouWei-T5Gemma)"
        )
    from ..file_format import check_llm_matches

    check_llm_matches(config, llm.info, llm.tokenizer)


def node_text_side(config, llm, system_prompt: str = "", skip_first: int = -1, t5_padding: str = "max_length",
                   backend: str = "transformers") -> TextSide:
    """The TextSide LLMDiffTextEncode runs for a published adapter: its reference settings, with the node's
    advanced inputs over them ("" / -1 = the reference value)."""
    if backend != "transformers":
        raise AdapterMismatchError(
            f"the {config.preset} adapter needs its text model from a Hugging Face folder in models/LLM (the states "
            "come from transformers' implementation); a text_encoders/ single file loaded through ComfyUI is not supported for it"
        )
    if t5_padding not in ("max_length", "flexible"):
        raise ValueError(f"t5_padding must be max_length or flexible, got {t5_padding!r}")
    side = config.text
    if side.encoder == "template":  # the recorded template governs; the node's Gemma / T5 settings do not apply
        return side
    if side.encoder == "any" and is_encoder(llm):  # a custom-size RouWei file: the T5Gemma recipe for an encoder
        side = replace(ROUWEI_T5GEMMA_TEXT, max_length=side.max_length)
    elif side.encoder == "any":
        side = replace(side, encoder="gemma_chat")
    if side.encoder == "gemma_chat":
        return with_overrides(side, system_prompt=system_prompt or None, skip_first=skip_first if skip_first >= 0 else None)
    return replace(side, pad=t5_padding == "max_length")
