"""Our replies' exact token ids, found again by their text when a client resends them.

Re-tokenizing an answer's text need not give the ids the model generated (BPE can merge the
text differently), and then the resent history would miss the KV cache from that answer on and
differ from what the terminal app's Session holds. So the text we sent maps back to our ids.

An answer is given back only to a prompt that holds, before it, the very ids (and pictures) it was
generated after, in the same cache namespace (serve/namespaces.py; a digest of them keys it with its
text): one request's ids for a text never become another conversation's that merely holds the same text (a
/v1/completions answer, another client's reply). That conversation's prompt, and so its answer, would
depend on what ran before it; it is tokenized as a fresh server would tokenize it.

The memory is bounded in answers and in tokens, and keeps ids packed (4 bytes each): as tuples of
Python ints, 1,024 answers of 8,192 tokens held 320 MiB that no setting accounted for.
"""

from __future__ import annotations

import hashlib
import threading
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING

from .namespaces import SHARED

if TYPE_CHECKING:
    from .conversation import Span

MAX_TOKENS = 1 << 21  # 8 MiB of packed ids: 1,024 answers of 2,048 tokens


class PromptDigest:
    """The digest of a prompt's ids and pictures (their runs' content keys: the same placeholders
    hold another picture) in its cache namespace, grown with the prompt: each assistant message of a
    long conversation looks up what comes before it, and the prompt is hashed once in all, not once per message."""

    def __init__(self, namespace: str = SHARED) -> None:
        self._ids, self._pictures = hashlib.sha256(), hashlib.sha256()
        self._namespace = namespace.encode()
        self._count = self._spans = 0

    def of(self, ids: list[int], spans: Sequence[Span]) -> bytes:
        """The digest of `ids` and their `spans`, which begin with those of the previous call."""
        self._ids.update(array("i", ids[self._count :]).tobytes())
        for span in spans[self._spans :]:
            self._pictures.update(f"{span.start}:{span.end}:{span.key}\n".encode("utf-8", "surrogatepass"))
        self._count, self._spans = len(ids), len(spans)
        return hashlib.sha256(self._namespace + self._ids.digest() + self._pictures.digest()).digest()


def prompt_digest(ids: list[int], spans: Sequence[Span], namespace: str = SHARED) -> bytes:
    return PromptDigest(namespace).of(ids, spans)


class AnswerMemory:
    def __init__(self, capacity: int = 1024, max_tokens: int = MAX_TOKENS):
        self.capacity = capacity
        self.max_tokens = max_tokens
        self.tokens = 0  # ids held in all
        self._ids: OrderedDict[bytes, array] = OrderedDict()  # the text's digest + the prompt's → ids
        self._lock = threading.Lock()

    @staticmethod
    def _key(text: str, after: bytes) -> bytes:
        """The text's digest, then the prompt's: conversations that said the same text each keep their own ids."""
        return hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest() + after

    def remember(self, text: str, ids: list[int], after: bytes) -> None:
        """`ids` answered with `text` a prompt whose prompt_digest is `after` (a text said again after it replaces them)."""
        if not text or not ids or len(ids) > self.max_tokens:
            return
        key = self._key(text, after)
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

    def lookup(self, text: str, after: bytes | None = None) -> list[int] | None:
        """Our ids for `text` answering a prompt whose prompt_digest is `after` (None: whatever the prompt, to inspect)."""
        with self._lock:
            if after is None:  # the latest ids said with this text (a scan: inspection only)
                said = self._key(text, b"")
                key = next((k for k in reversed(self._ids) if k.startswith(said)), b"")
            else:
                key = self._key(text, after)
            held = self._ids.get(key)
            if held is None:
                return None
            self._ids.move_to_end(key)
            return held.tolist()

    def __len__(self) -> int:
        return len(self._ids)
