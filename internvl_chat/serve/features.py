"""An LRU of projected image features by content key (sha256 of the bytes + tiling parameters).

A conversation resent with its images, or the same picture in another conversation, skips
decoding and the vision encoder when the prompt has to be prefilled again.
"""

from __future__ import annotations

from collections import OrderedDict

import torch


class FeatureCache:
    """Used from the engine thread only."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.bytes = 0
        self._items: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> torch.Tensor | None:
        features = self._items.get(key)
        if features is None:
            self.misses += 1
            return None
        self.hits += 1
        self._items.move_to_end(key)
        return features

    def put(self, key: str, features: torch.Tensor) -> None:
        size = features.numel() * features.element_size()
        if size > self.max_bytes or key in self._items:
            return
        self._items[key] = features
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, old = self._items.popitem(last=False)
            self.bytes -= old.numel() * old.element_size()

    def __len__(self) -> int:
        return len(self._items)
