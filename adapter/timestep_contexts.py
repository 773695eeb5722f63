"""Exact per-step contexts of a timestep-aware adapter for many conditioning entries.

LLMDiffTextEncode runs the LLM and `LLMDiffAdapter.encode_states` once per prompt and keeps the
result in the conditioning entry (`StepStates`); at every UNet call the ComfyUI wrapper
(nodes/timestep_aware/wrapper.py) asks `StepContexts` for each entry's context at that call's timestep.
This module is the pure part of that, free of ComfyUI so that it is tested against a reference and
benchmarked without it (the ComfyUI half is nodes/timestep_aware/):

- `state_length` / `fit_length`: every entry of one adapter is padded to one fixed token length
  (the template's own tokens plus the prompt budget), so entries have equal shapes and ComfyUI
  batches a positive and a negative in one UNet call even without the wrapper.
- `StepStates`: one entry's encoded states, its mask, its strength, and the context the text encode
  node wrote (to recognise whether another node has changed it since).
- `StepContexts`: all (entry, timestep) pairs of one model call go through ONE `decode` call,
  trimmed to the longest real prompt among them; each pair is computed once per call however many
  conditioning entries share it (SetArea, SetTimestepRange and ControlNet copies share one entry).
- `conditioning_context`: the conditioning tensor's layout (adapter tokens x llm_strength, then CLIP's),
  shared by the text encode node (nodes/conditioning.py) and StepContexts.

Why the entry carries EncodedStates rather than the LLM's states: the LLM's states of every layer
are layers x tokens x hidden floats (25 x 300 x 896 x 4 bytes = 27 MB for Qwen2.5-0.5B, several
hundred MB for a 7B model), and recomputing the adapter from them would run the fusion, projection,
refiner and the unmodulated resampler blocks again at every step although none of them depends on
the timestep. EncodedStates hold what is left after all of that: the 77 queries and, per modulated
block, the keys and values of the refined prompt tokens (about 2 MB at the default width and
budget), and the per-step work is only `decode` (0.6% of an SD1.5 UNet call in FLOPs).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F

from .model import EncodedStates, LLMDiffAdapter

# Slack for tokens that merge across the prompt's edges with the template's text: the padded length
# is rounded up to this multiple, which also keeps the shapes friendly to fused attention kernels.
LENGTH_MULTIPLE = 8


def state_length(template_tokens: int, max_tokens: int) -> int:
    """The fixed token length of one adapter's entries: its template's own tokens (the empty
    prompt's length) plus the prompt budget, rounded up to LENGTH_MULTIPLE."""
    if template_tokens < 1 or max_tokens < 1:
        raise ValueError(f"template_tokens and max_tokens must be >= 1, got {template_tokens}, {max_tokens}")
    return _round_up(template_tokens + max_tokens)


def _round_up(tokens: int) -> int:
    return math.ceil(tokens / LENGTH_MULTIPLE) * LENGTH_MULTIPLE


def fit_length(encoded: EncodedStates, mask: torch.Tensor, length: int) -> tuple[EncodedStates, torch.Tensor]:
    """Zero-pad or cut the token axis (the cross-attention keys/values and the mask) to `length`.

    Padded positions are masked out, so they change nothing; cutting is only for padding (the
    caller keeps every real token).
    """
    current = mask.shape[1]
    if current == length:
        return encoded, mask
    if current > length:
        cut = lambda t: t[:, :length]  # noqa: E731
    else:
        cut = lambda t: F.pad(t, (0, 0, 0, 0, 0, length - current))  # noqa: E731  # [B, T, heads, d]
    cross_kv = tuple((cut(k), cut(v)) for k, v in encoded.cross_kv)
    mask = mask[:, :length] if current > length else F.pad(mask, (0, length - current))
    return EncodedStates(encoded.queries, cross_kv, encoded.pooled), mask


@dataclass(eq=False)  # identity semantics: an entry is the same entry only if it is the same object
class StepStates:
    """One conditioning entry's timestep-independent part (batch 1), as LLMDiffTextEncode stores it."""

    encoded: EncodedStates  # token axis padded to the adapter's fixed length
    mask: torch.Tensor  # [1, T_fixed], 1 = real token (real tokens come first)
    tokens: int  # real tokens (the rest is padding)
    strength: float  # llm_strength: the context is decode(...) * strength
    context: torch.Tensor  # the conditioning tensor the encode node wrote: [1, N (+ CLIP tokens), C]
    num_tokens: int  # N: the adapter's tokens at the head of `context`
    adapter_id: str  # which adapter file made it (file identity), to refuse a mismatched adapter
    adapter_name: str  # for messages

    def __repr__(self) -> str:
        return f"StepStates({self.adapter_name!r}, {self.tokens} tokens padded to {self.mask.shape[1]}, strength {self.strength:g})"

    @classmethod
    def build(cls, encoded: EncodedStates, mask: torch.Tensor, length: int, **fields) -> "StepStates":
        """Pad `encoded`/`mask` (one prompt, real tokens first) to `length` (or more if the prompt is longer)."""
        tokens = int(mask[0].nonzero().max()) + 1
        encoded, mask = fit_length(encoded, mask, max(length, _round_up(tokens)))
        return cls(encoded=encoded, mask=mask, tokens=tokens, **fields)

    def is_untouched(self, context: torch.Tensor) -> bool:
        """Does `context` still start with the adapter tokens this entry wrote? Conditioning nodes that
        copy the entry (SetArea, SetTimestepRange, ControlNet apply) keep the very tensor; Concat
        appends tokens after ours; Average, ZeroOut and the like change them, and then the entry's
        states no longer describe the context."""
        if context is self.context:
            return True
        n = self.num_tokens
        if context.shape[0] != 1 or context.shape[1] < n or context.shape[2] != self.context.shape[2]:
            return False
        return torch.equal(context[:, :n].to(self.context.device, self.context.dtype), self.context[:, :n])


@dataclass
class StepContexts:
    """The adapter tokens of many entries at the timesteps of one model call, cached per (timestep, entry).

    Make one per model call: `prepare` decodes every pair not seen yet in one adapter call, `context`
    then assembles an entry's new conditioning tensor from the cache.
    """

    adapter: LLMDiffAdapter
    decoded: int = 0  # (entry, timestep) pairs run through the adapter
    _rows: dict = field(default_factory=dict)  # (id(entry), t) -> [1, N, C] on the adapter's device
    _alive: list = field(default_factory=list)  # keeps cached entries alive, so their ids stay unique

    def prepare(self, entries: Iterable[StepStates], timesteps: Sequence[float]) -> None:
        """Decode every (entry, t) pair that is not cached yet, all in one adapter call."""
        pairs, seen = [], set()
        for entry in entries:
            for t in dict.fromkeys(timesteps):  # unique, in order
                key = (id(entry), t)
                if key not in self._rows and key not in seen:
                    seen.add(key)
                    pairs.append((entry, t))
        if not pairs:
            return
        # Trim the padding to the longest real prompt here: less attention work, and without any
        # padding left the adapter attends unmasked, exactly as when it encoded the prompt alone.
        length = max(entry.tokens for entry, _ in pairs)
        fitted = [fit_length(entry.encoded, entry.mask, length) for entry, _ in pairs]
        param = next(self.adapter.parameters())
        move = lambda t: t.to(device=param.device, dtype=param.dtype)  # noqa: E731
        encoded = EncodedStates.cat([e for e, _ in fitted])
        encoded = EncodedStates(move(encoded.queries), tuple((move(k), move(v)) for k, v in encoded.cross_kv),
                                None if encoded.pooled is None else move(encoded.pooled))
        mask = torch.cat([m for _, m in fitted]).to(param.device)
        times = torch.tensor([t for _, t in pairs], dtype=torch.float32, device=param.device)
        with torch.no_grad():
            context = self.adapter.decode(encoded, mask, times).context
        for i, (entry, t) in enumerate(pairs):
            self._rows[(id(entry), t)] = context[i : i + 1]
            self._alive.append(entry)
        self.decoded += len(pairs)

    def context(self, entry: StepStates, original: torch.Tensor, timesteps: Sequence[float]) -> torch.Tensor:
        """`original` (an untouched context of `entry`) with its adapter tokens recomputed at `timesteps`.

        One timestep for the whole batch gives [1, M, C] (ComfyUI repeats it per sample); different
        timesteps per sample give [B, M, C], row b at timesteps[b]. M and the tokens after the
        adapter's (CLIP's in concat mode, or ConditioningConcat's) are kept, so the entry still
        batches with the same entries as before. Device and dtype are the original's.
        """
        steps = list(dict.fromkeys(timesteps))
        rows = [self._rows[(id(entry), t)] for t in (steps if len(steps) == 1 else timesteps)]
        tokens = torch.cat(rows).to(device=original.device, dtype=original.dtype)
        return conditioning_context(tokens, entry.strength, original[:, entry.num_tokens:])


def conditioning_context(adapter_tokens: torch.Tensor, strength: float, tail: torch.Tensor | None = None) -> torch.Tensor:
    """The conditioning tensor's layout: the adapter's tokens [B, N, C] times llm_strength, then `tail` (CLIP's tokens
    in concat mode, a Concat node's; [1, M, C], repeated per row) after them. The text encode node writes it once,
    the per-step wrapper again at every model call, so both must build it here."""
    tokens = adapter_tokens * strength
    if tail is None or tail.shape[1] == 0:
        return tokens
    return torch.cat([tokens, tail.expand(tokens.shape[0], -1, -1)], dim=1)
