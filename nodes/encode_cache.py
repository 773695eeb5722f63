"""A small LRU of adapter outputs, so re-queuing a prompt does not run the LLM again.

ComfyUI's own node cache only remembers a node's last inputs: changing a strength, a size field
or the connected CLIP, or going back to an earlier prompt, would run the LLM again. The key is
(LLM identity, adapter identity, prompt): the adapter file carries the prompt template, so its
identity (path, size, mtime) covers the template too. We keep the adapter's *output*, not the
LLM's states of every layer: those are layers x tokens x hidden (over 100 MB for a 7B model and a
long prompt), while an output is 77 x C floats (0.6 MB for SDXL).

Two bounds, whichever is hit first: 64 entries and 64 MiB of tensors (an SDXL entry is 0.6 MB, so
the entry count binds first for the shipped targets; the byte bound covers custom targets with
long, wide contexts). Cached tensors are detached and stored on a device the owner chooses (the
nodes pass ComfyUI's intermediate device: the CPU unless --gpu-only), never left in VRAM by the
run that produced them.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any, Callable, Hashable, Optional, Union

import torch

DEFAULT_MAX_ENTRIES = 64
DEFAULT_MAX_BYTES = 64 * 1024 * 1024

DeviceSpec = Union[str, torch.device, Callable[[], torch.device]]


def map_tensors(value: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """Apply `fn` to every tensor inside tuples (NamedTuples too), lists and dicts; other leaves unchanged."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return type(value)._make(map_tensors(v, fn) for v in value)
    if isinstance(value, (tuple, list)):
        return type(value)(map_tensors(v, fn) for v in value)
    if isinstance(value, dict):
        return {k: map_tensors(v, fn) for k, v in value.items()}
    return value


def tensor_bytes(value: Any) -> int:
    """Bytes held by the tensors inside `value` (same traversal as map_tensors)."""
    total = 0

    def count(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    map_tensors(value, count)
    return total


class EncodeCache:
    """Least-recently-used mapping bounded by entries and bytes (thread-safe: ComfyUI may run prompts off-thread)."""

    def __init__(self, max_entries: int = DEFAULT_MAX_ENTRIES, max_bytes: int = DEFAULT_MAX_BYTES,
                 storage_device: DeviceSpec = "cpu"):
        if max_entries < 0 or max_bytes < 0:
            raise ValueError(f"max_entries and max_bytes must be >= 0, got {max_entries} and {max_bytes}")
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._storage_device = storage_device
        self._items: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    @property
    def storage_device(self) -> torch.device:
        device = self._storage_device() if callable(self._storage_device) else self._storage_device
        return torch.device(device)

    def get(self, key: Hashable) -> Optional[Any]:
        with self._lock:
            if key not in self._items:
                return None
            self._items.move_to_end(key)
            return self._items[key][0]

    def put(self, key: Hashable, value: Any) -> Any:
        """Store `value` (its tensors detached and moved to the storage device) and return the stored copy."""
        device = self.storage_device
        value = map_tensors(value, lambda t: t.detach().to(device))
        size = tensor_bytes(value)
        if self.max_entries == 0 or size > self.max_bytes:
            return value
        with self._lock:
            if key in self._items:
                self._bytes -= self._items.pop(key)[1]
            self._items[key] = (value, size)
            self._bytes += size
            while len(self._items) > self.max_entries or self._bytes > self.max_bytes:
                self._bytes -= self._items.popitem(last=False)[1][1]
        return value

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0

    @property
    def nbytes(self) -> int:
        """Bytes of tensors held now."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._items)
