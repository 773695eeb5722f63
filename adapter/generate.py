"""Rewrite a prompt with the loaded LLM itself (the "Enhance prompt with LLM" node), from the SAME weights.

Adapters trained on dense captions do best with dense captions, so the LLM that feeds the adapter
can first expand a short prompt into one. The LLM was loaded for its hidden states, without an LM
head (load_llm uses AutoModel), so the head is built from what is already there, never by loading
the model a second time:
1. tied embeddings (`tie_word_embeddings`, true for Qwen2.5 <= 3B, Qwen3 4B, Llama 3.2, Gemma):
   the output head IS the input embedding matrix, already in memory;
2. otherwise the checkpoint's own `lm_head.weight`, read lazily as one tensor from the folder's
   safetensors (safe_open reads that tensor only) for the duration of the call;
3. otherwise the LLM cannot generate: LLMLoadError says why.

Decoding: the prompt goes through the tokenizer's chat template when it has one (instruction and
text in one user turn: Gemma's templates refuse a system turn), then one token at a time, with a
KV cache for transformers models. Sampling is temperature + top-p with a `torch.Generator` on the
CPU seeded from `seed` and used for nothing else, so the same seed, prompt and weights give the
same text on the same device and dtype, whatever else used torch's global RNG (GPU kernels may
differ in the last bits between devices or library versions, which can change a sampled token).
temperature 0 is greedy decoding (the seed has no effect).

An LLM from another implementation (ComfyUI's, nodes/comfy_llm.py) takes part by duck typing:
`final_hidden_states(input_ids) -> [1, T, H]` after the final norm (run on the whole sequence for
each token: ComfyUI's decoder has no KV cache), `tie_word_embeddings` and `final_logit_softcapping`.
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .errors import LLMLoadError
from .llm import LoadedLLM, text_decoder
from .template import plain_prefix_ids

__all__ = ["GenerationHead", "GenerationSettings", "build_generation_prompt", "enhance_prompt",
           "generate_tokens", "generation_head", "sample_next_token", "stop_token_ids"]

logger = logging.getLogger(__name__)

# End-of-turn markers of the supported chat formats (ChatML, Llama 3, Gemma): generation stops at any of them.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>", "<end_of_turn>")
_REASONING = re.compile(r"^\s*<think>.*?</think>\s*", re.DOTALL)  # Qwen3 may still emit an (empty) think block


@dataclass(frozen=True)
class GenerationSettings:
    max_new_tokens: int = 256
    seed: int = 0
    temperature: float = 0.7  # 0 = greedy
    top_p: float = 0.9  # nucleus sampling; 1 = off

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"temperature must be >= 0 and top_p in (0, 1]; got {self.temperature} and {self.top_p}")


@dataclass
class GenerationHead:
    """hidden [.., H] -> logits [.., V]: the output matrix and Gemma 2's final soft-capping."""

    weight: torch.Tensor  # [V, H]
    softcap: Optional[float] = None
    source: str = ""  # "tied input embedding" or the file the weight came from
    tied: bool = False  # the weight is the model's own input embedding (no extra memory)
    _ready: Optional[torch.Tensor] = field(default=None, repr=False)  # the weight on the hidden states' device/dtype

    @property
    def nbytes(self) -> int:
        return self.weight.numel() * self.weight.element_size()

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # In the weight's own dtype (an fp32 copy of a bf16 vocabulary matrix would double it); fp8
        # storage is widened to the hidden states' dtype. Moved/cast once per generation, not per token.
        dtype = self.weight.dtype if self.weight.dtype in (torch.float16, torch.bfloat16, torch.float32) else hidden.dtype
        if self._ready is None or self._ready.device != hidden.device or self._ready.dtype != dtype:
            self._ready = self.weight.to(device=hidden.device, dtype=dtype)
        logits = F.linear(hidden.to(dtype), self._ready).float()
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


def _model_config(llm):
    return getattr(text_decoder(llm.model), "config", None)


def _read_lm_head(folder: Path) -> Optional[tuple[torch.Tensor, str]]:
    """The checkpoint's `lm_head.weight` (or a multimodal `*.lm_head.weight`) from a safetensors folder, or None."""
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    else:
        weight_map = {}
        for file in sorted(folder.glob("*.safetensors")):
            with safe_open(file, framework="pt") as f:
                weight_map.update(dict.fromkeys(f.keys(), file.name))
    names = [k for k in weight_map if k == "lm_head.weight" or k.endswith(".lm_head.weight")]
    if not names:
        return None
    name = "lm_head.weight" if "lm_head.weight" in names else names[0]
    with safe_open(folder / weight_map[name], framework="pt") as f:
        return f.get_tensor(name), f"{weight_map[name]}:{name}"


def generation_head(llm) -> GenerationHead:
    """The output head from the loaded weights (see the module docstring); LLMLoadError when there is none."""
    config = _model_config(llm)
    tied = getattr(llm, "tie_word_embeddings", None)
    if tied is None:
        tied = bool(getattr(config, "tie_word_embeddings", False))
    softcap = getattr(llm, "final_logit_softcapping", getattr(config, "final_logit_softcapping", None))
    if tied:
        return GenerationHead(text_decoder(llm.model).get_input_embeddings().weight, softcap, "tied input embedding", tied=True)
    folder = getattr(text_decoder(llm.model), "name_or_path", "") if isinstance(llm, LoadedLLM) else ""
    found = _read_lm_head(Path(folder)) if folder and Path(folder).is_dir() else None
    if found is None:
        where = f"its weights in {folder} hold no lm_head.weight" if folder else "no lm_head.weight is available for it"
        raise LLMLoadError(
            f"{llm.info.name or llm.info.architecture} cannot generate text: its output layer is not tied to the input "
            f"embedding and {where}. Use the model's complete release (the *ForCausalLM checkpoint with its lm_head "
            "weights), or an LLM with tied embeddings, for Enhance prompt."
        )
    weight, source = found
    logger.info("Enhance prompt: the output layer of %s is read from %s", llm.info.name, source)
    return GenerationHead(weight.to(llm.dtype) if weight.is_floating_point() else weight, softcap, source)


def build_generation_prompt(tokenizer, instruction: str, text: str) -> list[int]:
    """Token ids of the request: the chat template (one user turn, generation prompt added) or, without one, plain text."""
    request = f"{instruction.strip()}\n\n{text.strip()}" if instruction.strip() else text.strip()
    if getattr(tokenizer, "chat_template", None):
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": request}], tokenize=False,
                                                 add_generation_prompt=True, enable_thinking=False)
        return tokenizer(rendered, add_special_tokens=False)["input_ids"]
    # Plain text: BOS as the encode path writes it (adapter/template.py), then the request.
    return plain_prefix_ids(tokenizer, request) + tokenizer(f"{request}\n\nCaption:", add_special_tokens=False)["input_ids"]


def stop_token_ids(tokenizer, folder: Optional[str] = None) -> set[int]:
    """EOS, the family's end-of-turn markers found in the vocabulary, and generation_config.json's eos ids."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    vocab = tokenizer.get_vocab()
    ids.update(vocab[token] for token in END_OF_TURN_TOKENS if token in vocab)
    generation_config = Path(folder) / "generation_config.json" if folder else None
    if generation_config is not None and generation_config.is_file():
        eos = json.loads(generation_config.read_text(encoding="utf-8")).get("eos_token_id")
        ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    return ids


def sample_next_token(logits: torch.Tensor, generator: torch.Generator, temperature: float, top_p: float) -> int:
    """One token id from fp32 logits [V]: greedy at temperature 0, else temperature + nucleus sampling on the CPU."""
    if temperature == 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float().cpu() / temperature, dim=-1)
    if top_p < 1:
        sorted_probs, order = torch.sort(probs, descending=True)
        outside = torch.cumsum(sorted_probs, dim=-1) - sorted_probs >= top_p  # the smallest set reaching top_p stays
        sorted_probs[outside] = 0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


class _CachedDecoder:
    """transformers decoder with a KV cache: feed the new tokens, get the last position's final hidden state."""

    def __init__(self, model, device):
        self.model, self.device, self.cache = text_decoder(model), device, None

    def __call__(self, new_ids: list[int]) -> torch.Tensor:
        ids = torch.tensor([new_ids], device=self.device)
        out = self.model(input_ids=ids, past_key_values=self.cache, use_cache=True, return_dict=True)
        self.cache = out.past_key_values
        return out.last_hidden_state[0, -1]


class _RecomputingDecoder:
    """A decoder without a KV cache (ComfyUI's): run the whole sequence for each new token."""

    def __init__(self, llm):
        self.llm, self.ids = llm, []

    def __call__(self, new_ids: list[int]) -> torch.Tensor:
        self.ids.extend(new_ids)
        return self.llm.final_hidden_states(torch.tensor([self.ids], device=self.llm.device))[0, -1]


def _decoder(llm):
    if isinstance(llm, LoadedLLM):
        return _CachedDecoder(llm.model, llm.device)
    if callable(getattr(llm, "final_hidden_states", None)):
        return _RecomputingDecoder(llm)
    raise LLMLoadError(f"{type(llm).__name__} cannot generate text: it exposes no way to run the decoder to its final "
                       "hidden states. Load the LLM with Load LLM (decoder-only) from a Hugging Face folder instead.")


def generate_tokens(decoder: Callable[[list[int]], torch.Tensor], head: GenerationHead, prompt_ids: list[int],
                    settings: GenerationSettings, stop_ids: set[int],
                    on_token: Optional[Callable[[int], None]] = None) -> list[int]:
    """Up to max_new_tokens new ids (the stop token excluded); `on_token(i)` runs after each one (progress, interruption)."""
    generator = torch.Generator(device="cpu").manual_seed(settings.seed)
    new: list[int] = []
    hidden = decoder(prompt_ids)
    for step in range(settings.max_new_tokens):
        token = sample_next_token(head.logits(hidden), generator, settings.temperature, settings.top_p)
        if on_token is not None:
            on_token(step)
        if token in stop_ids:
            break
        new.append(token)
        if step + 1 < settings.max_new_tokens:
            hidden = decoder([token])
    return new


def enhance_prompt(llm, text: str, instruction: str, settings: GenerationSettings = GenerationSettings(),
                   head: Optional[GenerationHead] = None, on_token: Optional[Callable[[int], None]] = None) -> str:
    """The LLM's rewrite of `text` following `instruction`, deterministic for settings.seed (see the module docstring)."""
    if not text.strip():
        raise ValueError("the text to enhance is empty: write a short prompt for the LLM to expand")
    head = head if head is not None else generation_head(llm)
    prompt_ids = build_generation_prompt(llm.tokenizer, instruction, text)
    folder = getattr(text_decoder(llm.model), "name_or_path", None) if isinstance(llm, LoadedLLM) else None
    with torch.no_grad():
        new = generate_tokens(_decoder(llm), head, prompt_ids, settings, stop_token_ids(llm.tokenizer, folder), on_token)
    return _REASONING.sub("", llm.tokenizer.decode(new, skip_special_tokens=True)).strip()
