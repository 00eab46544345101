"""OpenAI's `logprobs` of an answer: which tokens to list, and each as OpenAI shapes it.

A token is {"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}, ...]}.
The values are the model's own distribution (chat/sampling.py: log_softmax of the raw logits in
float32, before temperature, top-k/p and the repetition penalty). `bytes` are the token's real
bytes from the vocabulary (Tokenizer.token_bytes); `token` is those bytes decoded alone, so a
byte-level piece that holds part of a character shows U+FFFD for that part.

An entry knows whether the answer's text leaves its token out (`Entry.left_out`: a special token,
which the detokenizer never prints, or the stop token that ended the answer, `Entry.ends`), so the
legacy endpoint's `text_offset` gives it no characters (and puts the stop token at the text's end).

A token is listed once all of its text has been sent: text held back while it could begin a stop
string waits with it, and a token whose text a stop string cut (even in part) is never listed, so
the list describes exactly the answer the client got.
"""

from __future__ import annotations

import collections
import json
import sys
from typing import Any

from ..chat.detokenize import default_skip_ids
from ..chat.sampling import TokenLogprob
from ..engine.tokenizer import as_tokenizer

# OpenAI's value for a token too unlikely to say; JSON has no -Infinity (a half-precision logit can be -inf)
# and no NaN (an image token's NaN or +inf logit makes them NaN: banned from answers, it stops none)
LOGPROB_FLOOR = -9999.0


class Entry(dict):
    """One logprob entry, the dict OpenAI's JSON shows; `left_out`: an answer's text leaves its token
    out (a special token: chat/detokenize.py prints none); `ends`: the stop token that ended the
    answer, after all of its text (a character left unfinished before it is the text's last U+FFFD).
    Neither is part of the JSON."""

    __slots__ = ("left_out", "ends")

    def __init__(self, *args: Any, left_out: bool = False, ends: bool = False, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.left_out = left_out
        self.ends = ends


# What an entry takes in memory (measured on its parts, CPython's sizes): a dict of token, logprob
# and bytes, its float and its list of byte values (the token's text is TokenPieces' cached str,
# shared), an Entry's list of alternatives. About 4-5 times what it takes in the JSON sent (a
# dict there is ~60 bytes); the bound on a stream's unsent answer (serve/connections.py's
# UNSENT_BYTES) is a bound on the server's memory, so events are counted by this.
_ALTERNATIVE_BYTES = sys.getsizeof({"token": "", "logprob": 0.0, "bytes": []}) + sys.getsizeof(0.5) + sys.getsizeof([])
_ENTRY_BYTES = sys.getsizeof(Entry(token="", logprob=0.0, bytes=[], top_logprobs=[])) + sys.getsizeof(0.5) + 2 * sys.getsizeof([])
_SLOT_BYTES = 8  # a list's pointer to one of its items


def entries_bytes(entries: list[dict] | None) -> int:
    """About the memory `entries` (TokenPieces.content's, or entry's) take."""
    total = 0
    for entry in entries or ():
        top = entry.get("top_logprobs") or ()
        total += _ENTRY_BYTES + _SLOT_BYTES * (len(entry["bytes"]) + len(top) + 1)
        for alternative in top:
            total += _ALTERNATIVE_BYTES + _SLOT_BYTES * len(alternative["bytes"])
    return total


# A token's bytes as an estimate counts them before its answer exists (most of Qwen2's common tokens
# hold 1 to 6; a longer one adds 8 bytes a byte to its entry's list)
TOKEN_BYTES_GUESS = 4


def position_bytes(alternatives: int) -> int:
    """About the memory of one token's entry with `alternatives` listed (entries_bytes' count of a
    token and alternatives of TOKEN_BYTES_GUESS bytes each): ~380 bytes, and ~300 more per alternative."""
    byte_slots = _SLOT_BYTES * TOKEN_BYTES_GUESS
    return _ENTRY_BYTES + byte_slots + _SLOT_BYTES + alternatives * (_ALTERNATIVE_BYTES + byte_slots + _SLOT_BYTES)


def _entry_json_chars(alternatives: int) -> int:
    """The characters of one token's entry in an answer's JSON (a token and alternatives of
    TOKEN_BYTES_GUESS bytes each, a logprob of full float precision), as the response renders it."""
    token = {"token": "a" * TOKEN_BYTES_GUESS, "logprob": -1.2345678901234567, "bytes": [100] * TOKEN_BYTES_GUESS}
    entry = {**token, "top_logprobs": [token] * alternatives}
    return len(json.dumps(entry, separators=(",", ":"))) + 1  # and its comma in the list


def held_bytes(alternatives: int) -> int:
    """About the memory one token's entry takes in a non-streamed answer at its end: the entry
    (position_bytes) and its JSON, which the response holds as text and then as bytes (~300 bytes
    an alternative in the entry, ~75 in each JSON copy: n 16 × 32k tokens × top_logprobs 20 ~5 GB)."""
    return position_bytes(alternatives) + 2 * _entry_json_chars(alternatives)


class TokenPieces:
    """Token ids as OpenAI's logprob entries; each id's text and bytes are looked up once."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = as_tokenizer(tokenizer)
        self.left_out = frozenset(default_skip_ids(self.tokenizer))  # the ids an answer's text never shows
        self._pieces: dict[int, tuple[str, list[int]]] = {}  # at most one per vocabulary entry

    def piece(self, token_id: int) -> tuple[str, list[int]]:
        """The token's text (its bytes decoded alone) and its bytes as ints."""
        found = self._pieces.get(token_id)
        if found is None:
            raw = self.tokenizer.token_bytes(token_id)
            found = self._pieces[token_id] = (raw.decode("utf-8", "replace"), list(raw))
        return found

    def entry(self, token_id: int, logprob: float) -> dict:
        text, raw = self.piece(token_id)
        return {"token": text, "logprob": logprob if logprob > LOGPROB_FLOOR else LOGPROB_FLOOR, "bytes": list(raw)}

    def content(self, token: TokenLogprob, ends: bool = False) -> dict:
        """One entry of a choice's `logprobs.content` (`ends`: the stop token that ended the answer,
        whose text the answer never shows)."""
        left_out = ends or token.token_id in self.left_out
        out = Entry(self.entry(token.token_id, token.logprob), left_out=left_out, ends=ends)
        out["top_logprobs"] = [self.entry(token_id, logprob) for token_id, logprob in token.top]
        return out


class SentTokens:
    """Follows one answer's generated tokens against the text the stop strings let through.

    `receive` each generation event (its "text" and its tokens' ends in it, chat/generate.py),
    then `sent` with the text sent for it: the entries of the tokens whose text is now all sent."""

    def __init__(self, pieces: TokenPieces, keep: bool = True):
        self.pieces = pieces
        self.keep = keep  # False for a stream: it sent each entry with its text, and needs no list
        self.listed: list[dict] = []  # every entry given so far (if `keep`): the non-streaming answer's list
        self._received = 0  # characters of generated text so far
        self._sent = 0  # of them, those sent
        self._waiting: collections.deque[tuple[TokenLogprob, int]] = collections.deque()  # (token, end in the answer)

    def receive(self, event: dict) -> None:
        for token, end in event["logprobs"]:
            self._waiting.append((token, self._received + end))
        self._received += len(event["text"])

    def sent(self, text: str) -> list[dict]:
        self._sent += len(text)
        out = []
        while self._waiting and self._waiting[0][1] <= self._sent:
            out.append(self.pieces.content(self._waiting.popleft()[0]))
        if self.keep:
            self.listed.extend(out)
        return out


def logprobs_object(content: list[dict]) -> dict:
    """A choice's (or a chunk's) `logprobs`."""
    return {"content": content, "refusal": None}
