"""KV-cache slots: a few Sessions over one model, each keeping the last conversation it served.

Each slot owns KV tensors sized to the model's context (slot 0 adopts the model's own), so N slots
cost N × the KV cache in memory and switching between them costs nothing (the model is pointed at
the slot's tensors). A request goes to the slot whose cache shares the longest prefix with its
prompt — token ids equal and every image run in that prefix the same picture — as long as that
keeps at least half of what the slot holds; otherwise to the least recently used slot, so one new
conversation does not evict a long one to save a shared system prompt (llama.cpp's rule). A prefix
is kept only for a prompt of the cache namespace the slot's tokens were cached under (a request's
cache_salt, serve/namespaces.py): a client never learns how much of its prompt another one sent.

A slot whose cache was prefilled with scores (/v1/completions' echo with logprobs) keeps them, a
ScoredPrefix: a later scored prompt that shares its prefix keeps that much of the cache and those
scores, and scores only its own tokens (lm-eval's multiple-choice requests: one long context, a
few continuations). A scored prompt chooses its slot by what it can keep there, scores included:
a slot whose cache matches but holds no scores would score it from its first token. Every write
to the cache from position p keeps only the scores of tokens up to p (`keep_scores`), so a score
is never served for a token, or a context, the cache no longer holds.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..chat.kv_slots import common_prefix_length
from ..chat.session import Session
from ..engine.loader import LoadedModel
from .conversation import Prompt, Span
from .namespaces import SHARED

KEEP_FRACTION = 0.5


@dataclass
class Slot:
    index: int
    session: Session
    kv_bytes: int
    spans: list[Span] = field(default_factory=list)
    last_used: int = 0
    scores: ScoredPrefix | None = None  # the scores of the tokens its cache was prefilled with, when scored
    namespace: str = SHARED  # the cache namespace its tokens were cached under (serve/namespaces.py)

    @property
    def cached(self) -> int:
        return self.session.start_pos

    def reusable(self, prompt: Prompt) -> int:
        """How many leading prompt tokens this slot's cache can keep; at least one token is left to
        prefill. None of another cache namespace's: what it keeps is what `cached_tokens` tells the client."""
        if prompt.namespace != self.namespace:
            return 0
        n = self.session.cached_prefix(prompt.ids)
        n = _same_pictures(prompt.spans, self.spans, n)
        # and the other way: a prompt of token ids (/v1/completions) can spell out a picture's
        # <IMG_CONTEXT> run with no picture of its own; it must not get this slot's picture
        n = _same_pictures(self.spans, prompt.spans, n)
        return min(n, len(prompt.ids) - 1)

    def keepable(self, prompt: Prompt) -> int:
        """How many leading prompt tokens this slot can really keep: cached (`reusable`), and for a
        scored prompt each with its kept score (`scored_reuse`)."""
        return self.reusable(prompt) if prompt.scored_k is None else self.scored_reuse(prompt, prompt.scored_k)

    def claim(self, namespace: str) -> None:
        """The cache is about to be written for a prompt of `namespace`: one of another namespace's is
        forgotten first (such a prompt keeps none of it), so that, whatever fails before the write,
        none of it is ever kept for this namespace."""
        if namespace != self.namespace:
            self.session.clear()
            self.spans, self.scores, self.namespace = [], None, namespace

    def scored_reuse(self, prompt: Prompt, k: int) -> int:
        """How many leading prompt tokens a prompt scored with k alternatives can keep: cached (as
        `reusable` says) and each with its stored score (the first has none), the token right after
        them too, whose score comes from the last kept position. 0 when the stored scores list
        fewer than k alternatives, or none are stored."""
        kept = self.scores
        if kept is None or kept.k < k:
            return 0
        same = common_prefix_length(kept.ids, prompt.ids)  # the scored ids the prompt begins with
        return max(0, min(self.reusable(prompt), len(kept.rows), same - 1))

    def keep_scores(self, start: int) -> None:
        """The cache is about to be written from position `start`: keep the scores of the tokens up
        to `start` alone (a token's score depends only on the positions before it), none if that is none."""
        kept = self.scores
        if kept is None or start >= len(kept.ids):
            return
        self.scores = ScoredPrefix(kept.k, kept.ids[: start + 1], kept.rows[:start]) if start > 0 else None


@dataclass
class ScoredPrefix:
    """Scored prompt tokens (engine/model.py's PromptScores): `rows[j - 1]` is token `ids[j]`'s
    [value, k values, k ids] given `ids[:j]`, as long as the slot's cache holds `ids[:j]`. At most
    one row per position of the slot's context (88 bytes each with k = 5)."""

    k: int
    ids: list[int]  # len(rows) + 1 ids
    rows: torch.Tensor  # [len(ids) - 1, 1 + 2k] float64 on the CPU

    def first(self, count: int, k: int) -> torch.Tensor:
        """The first `count` rows with k alternatives each (the k most likely of the stored ones)."""
        return with_alternatives(self.rows[:count], self.k, k)


def with_alternatives(rows: torch.Tensor, stored_k: int, k: int) -> torch.Tensor:
    """PromptScores rows made with `stored_k` alternatives cut to their first (most likely) k."""
    if k == stored_k:
        return rows
    columns = [0, *range(1, 1 + k), *range(1 + stored_k, 1 + stored_k + k)]
    return rows[:, columns]


def _same_pictures(spans: list[Span], others: list[Span], n: int) -> int:
    """How much of the first n tokens to keep so that each of `spans` in them is one of `others`,
    the same picture at the same place."""
    theirs = {(s.start, s.end): s.key for s in others}
    for span in spans:
        if span.start >= n:
            break
        if span.end > n or theirs.get((span.start, span.end)) != span.key:
            return span.start  # never split an image, never keep another picture's features
    return n


class SlotPool:
    def __init__(self, loaded: LoadedModel, count: int, stream_interval: int = 1):
        self.slots: list[Slot] = []
        self._clock = 0
        for i in range(count):
            session = Session(loaded, system_message=None, use_checkpoint_system=False, stream_interval=stream_interval)
            kv_bytes = session.own_kv_cache(share_model_cache=(i == 0))
            self.slots.append(Slot(i, session, kv_bytes))

    def choose(self, prompt: Prompt) -> tuple[Slot, int]:
        """The slot for this prompt and how many of its tokens it keeps there (`keepable`). The slot
        counts as used only from `use` on: a request that fails before its prefill (media that do not
        decode, a client that left) leaves the slot's conversation, and its place in the LRU order, as they were."""
        kept = [(slot.keepable(prompt), slot) for slot in self.slots]
        lru = min(self.slots, key=lambda s: s.last_used)
        keeping = [(r, s) for r, s in kept if r > 0 and (r >= KEEP_FRACTION * s.cached or s is lru)]
        if keeping:
            reuse, slot = max(keeping, key=lambda rs: (rs[0], -rs[1].last_used))
        else:
            empty = [s for s in self.slots if s.cached == 0]
            slot = empty[0] if empty else lru
            reuse = next(r for r, s in kept if s is slot)
        return slot, reuse

    def use(self, slot: Slot) -> None:
        """The chosen slot's cache is about to be rewound and prefilled: it is the most recently used."""
        self._clock += 1
        slot.last_used = self._clock

    @property
    def kv_bytes(self) -> int:
        return sum(s.kv_bytes for s in self.slots)
