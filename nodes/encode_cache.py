"""A small LRU of adapter outputs, so re-queuing a prompt does not run the LLM again.

ComfyUI's own node cache only remembers a node's last inputs: changing a strength, a size field
or the connected CLIP, or going back to an earlier prompt, would run the LLM again. The key is
(LLM identity, adapter identity, prompt): the adapter file carries the prompt template, so its
identity (path, size, mtime) covers the template too. We keep the adapter's *output*, not the
LLM's states of every layer: those are layers x tokens x hidden (over 100 MB for a 7B model and a
long prompt), while an output is 77 x C floats (at most 0.6 MB for SDXL). With the default bound
of 64 entries the cache holds at most about 40 MB of CPU memory.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any, Hashable, Optional

DEFAULT_MAX_ENTRIES = 64


class EncodeCache:
    """Least-recently-used mapping with a fixed number of entries (thread-safe: ComfyUI may run prompts off-thread)."""

    def __init__(self, max_entries: int = DEFAULT_MAX_ENTRIES):
        if max_entries < 0:
            raise ValueError(f"max_entries must be >= 0, got {max_entries}")
        self.max_entries = max_entries
        self._items: OrderedDict[Hashable, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> Optional[Any]:
        with self._lock:
            if key not in self._items:
                return None
            self._items.move_to_end(key)
            return self._items[key]

    def put(self, key: Hashable, value: Any) -> None:
        if self.max_entries == 0:
            return
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.max_entries:
                self._items.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def __len__(self) -> int:
        return len(self._items)
