"""Our replies' exact token ids, found again by their text when a client resends them.

Re-tokenizing an answer's text need not give the ids the model generated (BPE can merge the
text differently), and then the resent history would miss the KV cache from that answer on and
differ from what the terminal app's Session holds. So the text we sent maps back to our ids.

The memory is bounded in answers and in tokens, and keeps ids packed (4 bytes each): as tuples of
Python ints, 1,024 answers of 8,192 tokens held 320 MiB that no setting accounted for.
"""

from __future__ import annotations

import hashlib
import threading
from array import array
from collections import OrderedDict

MAX_TOKENS = 1 << 21  # 8 MiB of packed ids: 1,024 answers of 2,048 tokens


class AnswerMemory:
    def __init__(self, capacity: int = 1024, max_tokens: int = MAX_TOKENS):
        self.capacity = capacity
        self.max_tokens = max_tokens
        self.tokens = 0  # ids held in all
        self._ids: OrderedDict[bytes, array] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def _key(text: str) -> bytes:
        return hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()

    def remember(self, text: str, ids: list[int]) -> None:
        if not text or not ids or len(ids) > self.max_tokens:
            return
        key = self._key(text)
        packed = array("i", ids)  # token ids are < 2**31
        with self._lock:
            old = self._ids.pop(key, None)
            if old is not None:
                self.tokens -= len(old)
            self._ids[key] = packed
            self.tokens += len(packed)
            while len(self._ids) > self.capacity or self.tokens > self.max_tokens:
                _, dropped = self._ids.popitem(last=False)
                self.tokens -= len(dropped)

    def lookup(self, text: str) -> list[int] | None:
        key = self._key(text)
        with self._lock:
            ids = self._ids.get(key)
            if ids is None:
                return None
            self._ids.move_to_end(key)
            return ids.tolist()

    def __len__(self) -> int:
        return len(self._ids)
