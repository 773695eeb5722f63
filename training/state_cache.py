"""The frozen LLM's states cached on disk per caption: opt-in (`--set data.cache_llm_states=true`).

By default the trainer runs the LLM on every step's captions (docs/design.md section 4): the states of every
layer are large (layers x tokens x hidden per caption, e.g. 29 x 60 x 1536 x 2 bytes = 5 MB for
Qwen2.5-1.5B in bf16), so a cache pays only when the LLM forward is a real share of the step and the
dataset's distinct captions fit on disk. This module holds that cache:

* one safetensors file per caption: `states` [L+1, T, H] of the caption's real tokens only (no padding),
  in the LLM's dtype, so a cached batch is exactly what `encode_prompts` returns up to padding, which the
  adapter zeroes and masks anyway;
* keyed by sha256 over (the LLM's fingerprint, the prompt template, the caption): another LLM, other
  weights, another dtype or template can never be served stale states;
* written atomically (training/latent_cache.py's TensorStore), in the pre-step before multi-process
  communication starts, each process computing every world_size-th caption, like the latent cache;
* refused up front, with the numbers, when it would exceed `data.llm_cache_max_gb` or the free disk.

Caption dropout trains on the empty prompt "" (the template with an empty user span); it is one more
cached caption, so dropout reads exactly the conditioning the online path would compute. The cache is
valid only because the LLM is frozen, which the trainer always keeps it (adapter/llm.py loads it with
requires_grad False); `StateCache` checks that instead of assuming it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F

from adapter import LoadedLLM, TemplateConfig, encode_prompts, tokenize_prompts
from adapter.llm import EncodedPrompts
from training.config import TrainConfigError
from training.latent_cache import TensorStore

log = logging.getLogger(__name__)

CACHE_VERSION = "1"
SAMPLES_PER_TENSOR = 1024  # values of each weight tensor that enter the fingerprint (besides its sum)


def _size(num_bytes: float) -> str:
    return f"{num_bytes / 1e9:.2f} GB" if num_bytes >= 1e9 else f"{num_bytes / 1e6:.1f} MB"


def llm_fingerprint(llm: LoadedLLM) -> str:
    """sha256 over the LLM's identity (LLMInfo, dtype) and its weights.

    Hashing every byte of a multi-GB LLM would add tens of seconds to each start, so each tensor
    contributes its name, shape, dtype, its float64 sum and up to 1024 evenly strided values: any
    other checkpoint, fine-tune or merge changes those, and they cost one pass over memory."""
    info = dataclasses.asdict(llm.info)
    info.pop("name", None)  # the folder name is informational; the same model under another name is the same
    digest = hashlib.sha256(f"{CACHE_VERSION}|{json.dumps(info, sort_keys=True)}|{llm.dtype}".encode())
    weights_digest(digest, llm.model.state_dict())
    return digest.hexdigest()


@torch.no_grad()
def weights_digest(digest, state_dict: dict[str, torch.Tensor]) -> None:
    """Feed a model's weights into `digest`: per tensor its name, shape, dtype, float64 sum and up to
    SAMPLES_PER_TENSOR evenly strided values (one pass over memory, not a hash of every byte)."""
    for name, tensor in sorted(state_dict.items()):
        flat = tensor.detach().flatten()
        sample = flat[:: max(1, flat.numel() // SAMPLES_PER_TENSOR)][:SAMPLES_PER_TENSOR]
        digest.update(f"|{name}|{tuple(tensor.shape)}|{tensor.dtype}|{float(flat.sum(dtype=torch.float64))!r}|".encode())
        digest.update(sample.to("cpu", torch.float32).numpy().tobytes())


class StateCache:
    """Per-caption LLM states on disk, and an `encode(prompts)` that returns what `encode_prompts` would."""

    def __init__(self, folder: Path, llm: LoadedLLM, template: TemplateConfig):
        if any(p.requires_grad for p in llm.model.parameters()):
            raise TrainConfigError("data.cache_llm_states needs a frozen LLM (its states must not change during "
                                   "training); set data.cache_llm_states=false")
        self.store = TensorStore(folder)
        self.llm, self.template = llm, template
        self.prefix = f"{llm_fingerprint(llm)}|{json.dumps(dataclasses.asdict(template), sort_keys=True)}|"
        self.computed = 0  # entries this process computed (a reused cache computes none)

    def key(self, caption: str) -> str:
        return hashlib.sha256((self.prefix + caption).encode("utf-8")).hexdigest()

    def check_budget(self, captions: list[str], max_gb: float, batch_size: int = 64) -> float:
        """Bytes the cache needs for `captions` (token counts from the tokenizer alone, no LLM run); raises a
        TrainConfigError with the numbers when that exceeds `max_gb` or the free space of the cache's disk."""
        info = self.llm.info
        element = torch.empty((), dtype=self.llm.dtype).element_size()
        per_token = (info.num_layers + 1) * info.hidden_size * element
        tokens = 0
        for start in range(0, len(captions), batch_size):
            mask = tokenize_prompts(self.llm.tokenizer, self.template, captions[start:start + batch_size]).attention_mask
            tokens += int(mask.sum())
        need = tokens * per_token
        free = shutil.disk_usage(self.store.folder).free
        detail = (f"{len(captions)} distinct captions x {tokens / max(1, len(captions)):.0f} tokens on average x "
                  f"{info.num_layers + 1} layers x {info.hidden_size} hidden x {element} bytes")
        if need > max_gb * 1e9:
            raise TrainConfigError(
                f"data.cache_llm_states: the LLM-state cache would need {_size(need)} ({detail}), over "
                f"data.llm_cache_max_gb={max_gb:g}. Raise data.llm_cache_max_gb if the disk holds it, or set "
                "data.cache_llm_states=false (the default: the LLM runs on each step's captions instead).")
        if need > free:
            raise TrainConfigError(
                f"data.cache_llm_states: the LLM-state cache would need {_size(need)} ({detail}) but "
                f"{self.store.folder} has {_size(free)} free. Point data.llm_cache_dir at a larger disk, or set "
                "data.cache_llm_states=false.")
        log.info("LLM-state cache: %s for %s, in %s", _size(need), detail, self.store.folder)
        return need

    def fill(self, captions: list[str], batch_size: int) -> None:
        """Compute and store the states of every caption in `captions` that has no entry yet."""
        missing = [c for c in captions if not self.store.path(self.key(c)).is_file()]
        for start in range(0, len(missing), batch_size):
            self._compute(missing[start:start + batch_size])
        if missing:
            log.info("LLM-state cache: computed %d of %d captions into %s", len(missing), len(captions), self.store.folder)

    @torch.no_grad()
    def _compute(self, captions: list[str]) -> list[torch.Tensor]:
        encoded = encode_prompts(self.llm, self.template, captions)
        out = []
        for i, caption in enumerate(captions):  # right-padded: a caption's real tokens are its first n
            states = encoded.hidden_states[i, :, : int(encoded.attention_mask[i].sum())]
            self.store.put(self.key(caption), {"states": states})
            out.append(states)
        self.computed += len(captions)
        return out

    def encode(self, prompts: list[str]) -> EncodedPrompts:
        """What `encode_prompts(llm, template, prompts)` returns, with the states read from the cache.

        Tokenizing again is cheap and gives the exact mask, padding length and infos of the online path;
        an entry that is missing (e.g. written on a disk this node cannot see) is computed here."""
        tokens = tokenize_prompts(self.llm.tokenizer, self.template, prompts)
        length = tokens.input_ids.shape[1]
        rows = []
        for i, prompt in enumerate(prompts):
            entry = self.store.get(self.key(prompt))
            states = entry["states"] if entry is not None else self._compute([prompt])[0]
            n = int(tokens.attention_mask[i].sum())
            if states.shape[1] != n:  # the key covers tokenizer and template, so this means a damaged entry
                raise RuntimeError(f"LLM-state cache entry {self.store.path(self.key(prompt))} holds {states.shape[1]} "
                                   f"tokens but {prompt[:60]!r} has {n}: delete the cache folder {self.store.folder}")
            rows.append(F.pad(states, (0, 0, 0, length - n)))  # zero padding: the adapter zeroes it anyway
        hidden = torch.stack(rows).to(self.llm.device, self.llm.dtype)
        return EncodedPrompts(hidden, tokens.attention_mask.to(self.llm.device), tokens.infos)


def distinct_captions(captions: list[str]) -> list[str]:
    """The dataset's distinct captions plus "" (caption dropout's empty prompt), in a stable order."""
    return sorted(set(captions) | {""})
