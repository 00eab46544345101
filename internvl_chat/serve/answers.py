"""Our replies' exact token ids, found again by their text when a client resends them.

Re-tokenizing an answer's text need not give the ids the model generated (BPE can merge the
text differently), and then the resent history would miss the KV cache from that answer on and
differ from what the terminal app's Session holds. So the text we sent maps back to our ids.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict


class AnswerMemory:
    def __init__(self, capacity: int = 1024):
        self.capacity = capacity
        self._ids: OrderedDict[bytes, tuple[int, ...]] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def _key(text: str) -> bytes:
        return hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()

    def remember(self, text: str, ids: list[int]) -> None:
        if not text or not ids:
            return
        key = self._key(text)
        with self._lock:
            self._ids[key] = tuple(ids)
            self._ids.move_to_end(key)
            while len(self._ids) > self.capacity:
                self._ids.popitem(last=False)

    def lookup(self, text: str) -> list[int] | None:
        key = self._key(text)
        with self._lock:
            ids = self._ids.get(key)
            if ids is None:
                return None
            self._ids.move_to_end(key)
            return list(ids)

    def __len__(self) -> int:
        return len(self._ids)
