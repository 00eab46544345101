"""The checkpoint's tokenizer: what the app needs of it, loaded without importing transformers.

`load_tokenizer(dir)` reads `tokenizer.json` with the `tokenizers` library (the same Rust
backend transformers' fast tokenizers wrap) and applies what transformers adds from
`tokenizer_config.json`: added tokens missing from tokenizer.json and the named special tokens.
Only a checkpoint without tokenizer.json (vocab.json + merges.txt; a tokenizer.model alone is
refused) goes through transformers' AutoTokenizer, imported then. Both are used through one interface, `Tokenizer`:

- `encode(text)`: ids of `text` and nothing else — no BOS/EOS added, and text that looks like a
  special token (a user typing "<|im_end|>") is tokenized as plain text, as transformers does
  with `split_special_tokens=True` (SPEC §3: user text cannot inject control tokens);
- `decode(ids, skip_special_tokens=False)`: text, without transformers' space clean-up;
- `convert_tokens_to_ids` (None when absent), `get_vocab` (read-only), `len()`;
- `special_ids`: every special token (never printed), and `SpecialTokens` for the chat template;
- `token_bytes(id)`: the token's own bytes (a byte-level BPE piece can be part of a character,
  which decoding alone would turn into U+FFFD): the server's logprobs `bytes`.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from ..errors import CheckpointError
from ..files import JSON_LIMIT, TEXT_LIMIT, brief_repr, read_bytes_file, read_text_file, undecodable_byte, visible
from ..native_stderr import captured
from .checkpoint_json import LFS_POINTER, refuse_lfs_pointer, shown_json
from .config import MAX_VOCAB

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
# files AutoTokenizer can build a tokenizer from when there is no tokenizer.json
_SLOW_FILES = ("vocab.json", "merges.txt", "tokenizer.model")
# what else it reads then, each whole
_SLOW_EXTRAS = (TOKENIZER_CONFIG, "special_tokens_map.json", "added_tokens.json", "chat_template.json", "chat_template.jinja")
# the classes InternVL3's checkpoints name (-hf layouts: the fast one), which read vocab.json and
# merges.txt as Qwen2 does; without tokenizer.json, tokenizer_class must be one of them
QWEN2_TOKENIZER_CLASSES = ("Qwen2Tokenizer", "Qwen2TokenizerFast")
_NAMED_SPECIALS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")
# The fields tokenizers' AddedToken takes. transformers builds one from each token object of
# tokenizer_config.json and special_tokens_map.json, and for any other key the constructor itself
# prints "Ignored unknown kwarg option KEY" to stdout (Rust, past Python): the file's text reached
# the terminal raw, escape sequences and all, and broke `--json` output. "__type" marks the legacy
# form of a named special token, which transformers removes before it builds the token.
_ADDED_TOKEN_FLAGS = ("single_word", "lstrip", "rstrip", "normalized", "special")  # true or false each
_ADDED_TOKEN_FIELDS = frozenset({"content", *_ADDED_TOKEN_FLAGS})
_SPECIAL_TOKENS_MAP = "special_tokens_map.json"


class Tokenizer(ABC):
    """The tokenizer interface the chat code uses (see the module docstring)."""

    special_ids: frozenset[int] = frozenset()

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """See the module docstring."""

    @abstractmethod
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """See the module docstring."""

    @abstractmethod
    def convert_tokens_to_ids(self, token: str) -> int | None:
        """See the module docstring."""

    @abstractmethod
    def get_vocab(self) -> Mapping[str, int]:
        """See the module docstring."""

    def __len__(self) -> int:
        return len(self.get_vocab())

    def token_bytes(self, token_id: int) -> bytes:
        """See the module docstring. This default decodes the token alone: part of a character
        comes back as U+FFFD's bytes (a byte-level vocabulary reads the real ones)."""
        return self.decode([token_id]).encode("utf-8", "surrogatepass")

    def fewest_tokens(self, text: str) -> int:
        """A lower bound on len(encode(text)), without encoding: each token covers at most as many
        bytes of text as its vocabulary entry has in UTF-8 (a byte-level BPE entry spells each byte
        with one character of 1-2 bytes), times 3 for Unicode normalisation, which can compose up
        to three characters' bytes into one (Hangul jamo). Encoding a 15 MB paste takes ~25 s and
        ~3 GB just to learn that it does not fit; this takes milliseconds."""
        longest = self.__dict__.get("_longest_entry")
        if longest is None:
            longest = self._longest_entry = max((len(t.encode("utf-8", "surrogatepass")) for t in self.get_vocab()), default=1)
        return len(text.encode("utf-8", "surrogatepass")) // (3 * max(longest, 1))


class FastTokenizer(Tokenizer):
    """A `tokenizers.Tokenizer` (from tokenizer.json) with transformers' loading rules applied."""

    def __init__(self, backend: Any, special_ids: frozenset[int]):
        self.backend = backend
        self.special_ids = special_ids
        self._vocab: dict[str, int] = {}  # kept as a dict (a read-only view of it is handed out): it pickles
        self._vocab_size = -1  # the backend's size when `_vocab` was built
        backend.no_truncation()  # a truncation/padding setting saved in tokenizer.json must not cut prompts
        backend.no_padding()
        if getattr(backend.model, "dropout", None):  # BPE dropout (for training) made encoding random: other ids each time
            backend.model.dropout = None
        backend.encode_special_tokens = True  # special-token text in the input stays text

    def encode(self, text: str) -> list[int]:
        if not text:
            return []
        with _panics_as_errors(), captured():
            return list(self.backend.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        ids = [int(i) for i in ids]
        if skip_special_tokens:
            ids = [i for i in ids if i not in self.special_ids]
        # no fd 2 window here (~15 µs, twice per generated token): the regex that panics is the
        # pre-tokenizer's, which only encoding runs, or a decoder's Replace, found at start (_check_round_trip)
        with _panics_as_errors():
            return self.backend.decode(ids, skip_special_tokens=False)

    def convert_tokens_to_ids(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def token_bytes(self, token_id: int) -> bytes:
        added = self.__dict__.get("_added")
        if added is None:
            added = self._added = frozenset(self.backend.get_added_tokens_decoder())
        piece = _backend_bytes(self.backend, token_id, added)
        return piece if piece is not None else super().token_bytes(token_id)

    def get_vocab(self) -> Mapping[str, int]:
        """Built once per vocabulary size (tokens can only be added): ~0.14 s on Qwen2's, and a start
        asks for it three times (the special ids, the id checks, fewest_tokens' longest entry)."""
        size = self.backend.get_vocab_size(with_added_tokens=True)
        if size != self._vocab_size:
            self._vocab, self._vocab_size = self.backend.get_vocab(with_added_tokens=True), size
        return MappingProxyType(self._vocab)

    def __len__(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)


class TokenizerPanic(CheckpointError):
    """The backend's panic on some text, as one line; `reason`: the panic's own first line."""

    reason = ""


@contextlib.contextmanager
def _panics_as_errors() -> Iterator[None]:
    """The Rust backend panics where tokenizer.json asks for what it cannot do (a regex that runs
    past its backtracking limit); pyo3 raises that as a PanicException, a BaseException that would
    end the app. It becomes one error line, and the conversation goes on. Rust's panic hook has
    already written the panic and a backtrace to fd 2 by then, which `captured` (around encode)
    keeps off the terminal (the exception holds the reason)."""
    try:
        yield
    except BaseException as e:
        if type(e).__name__ != "PanicException":
            raise
        error = TokenizerPanic(
            f"the checkpoint's tokenizer.json failed on this text ({_first_line(e)}); it is damaged or not "
            "InternVL's: re-download the tokenizer files"
        )
        error.reason = _first_line(e)
        raise error from None


class TransformersTokenizer(Tokenizer):
    """A transformers tokenizer (the fallback, and the reference in tests) behind the same interface."""

    def __init__(self, hf: Any):
        self.hf = hf
        ids = set(getattr(hf, "all_special_ids", ()) or ())
        for token_id, added in (getattr(hf, "added_tokens_decoder", None) or {}).items():
            if getattr(added, "special", False):
                ids.add(int(token_id))
        self.special_ids = frozenset(ids)

    def encode(self, text: str) -> list[int]:
        if not text:
            return []
        return list(self.hf(text, add_special_tokens=False, split_special_tokens=True).input_ids)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        ids = [int(i) for i in ids]
        if skip_special_tokens:  # the same rule as FastTokenizer: every special id is skipped
            ids = [i for i in ids if i not in self.special_ids]
        return self.hf.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def convert_tokens_to_ids(self, token: str) -> int | None:
        token_id = self.hf.convert_tokens_to_ids(token)
        # a missing token maps to None or to the unknown token's id, depending on the tokenizer
        if isinstance(token_id, int) and self.hf.convert_ids_to_tokens(token_id) == token:
            return token_id
        return None

    def get_vocab(self) -> Mapping[str, int]:
        return self.hf.get_vocab()

    def token_bytes(self, token_id: int) -> bytes:
        added = getattr(self.hf, "added_tokens_decoder", None) or {}
        backend = getattr(self.hf, "backend_tokenizer", None)  # a fast tokenizer's tokenizers.Tokenizer
        if backend is not None:
            piece = _backend_bytes(backend, token_id, added)
        elif token_id not in added and isinstance(getattr(self.hf, "byte_decoder", None), dict):
            piece = byte_level_bytes(self.hf.convert_ids_to_tokens(token_id))  # a slow GPT-2-style one (Qwen2Tokenizer)
        else:
            piece = None
        return piece if piece is not None else super().token_bytes(token_id)

    def __len__(self) -> int:
        return len(self.hf)


def _byte_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet (Qwen2's too): each byte is spelled by one printable character,
    itself where Latin-1 prints it (33-126, 161-172, 174-255), else the next code point from U+0100."""
    printable = {*range(33, 127), *range(161, 173), *range(174, 256)}
    spelled, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            spelled[chr(byte)] = byte
        else:
            spelled[chr(256 + extra)] = byte
            extra += 1
    return spelled


BYTE_ALPHABET = _byte_alphabet()


def byte_level_bytes(piece: str | None) -> bytes | None:
    """The bytes a byte-level vocabulary entry spells, or None when it is not one (a character
    outside the alphabet)."""
    if not piece or any(char not in BYTE_ALPHABET for char in piece):
        return None
    return bytes(BYTE_ALPHABET[char] for char in piece)


def _backend_bytes(backend: Any, token_id: int, added: Any) -> bytes | None:
    """A `tokenizers.Tokenizer` entry's bytes when its vocabulary is byte-level, else None. Added
    tokens are their own text, not spelled in the byte alphabet."""
    if token_id in added or type(backend.decoder).__name__ != "ByteLevel":
        return None
    return byte_level_bytes(backend.id_to_token(token_id))


def as_tokenizer(tokenizer: Any) -> Tokenizer:
    """`tokenizer` itself, or a transformers tokenizer wrapped in the app's interface."""
    return tokenizer if isinstance(tokenizer, Tokenizer) else TransformersTokenizer(tokenizer)


# -------------------------------------------------------------------------------- loading


def load_tokenizer(model_dir: str | Path, vocab_size: int | None = None) -> Tokenizer:
    """The checkpoint's tokenizer, local files only, no remote code. `vocab_size`: config.json's,
    which bounds how many entries the tokenizer files may hold (None: the largest a config may declare)."""
    model_dir = Path(model_dir)
    if os.path.lexists(model_dir / TOKENIZER_JSON):  # a folder, a FIFO or a broken link is named, not taken for none
        return _load_fast(model_dir, vocab_size)
    if any((model_dir / f).is_file() for f in _SLOW_FILES):
        return _load_with_transformers(model_dir, vocab_size)
    raise CheckpointError(
        f"{_shown(model_dir)} has no tokenizer files (tokenizer.json / tokenizer_config.json); download the full checkpoint"
    )


def _token_content(value: Any) -> str | None:
    """A special token as written in tokenizer_config.json: a string or {"content": ...}. A lone
    surrogate (a JSON "\\ud800" escape) is no text: the backend cannot take it."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value and undecodable_byte(value) is None else None


def _load_fast(model_dir: Path, vocab_size: int | None) -> FastTokenizer:
    from tokenizers import AddedToken
    from tokenizers import Tokenizer as Backend

    text = read_text_file(model_dir / TOKENIZER_JSON, "the tokenizer file", JSON_LIMIT, CheckpointError)
    refuse_lfs_pointer(model_dir / TOKENIZER_JSON, text[: len(LFS_POINTER)].encode())
    _check_entry_count(model_dir / TOKENIZER_JSON, text, vocab_size)
    _check_pattern_size(model_dir / TOKENIZER_JSON, text)
    _check_added_token_bytes(model_dir / TOKENIZER_JSON, (content for _, content in _added_token_entries(text)))
    # The Rust parser raises plain Exceptions for a malformed file, and panics on some values (a BPE's
    # continuing_subword_prefix, for one): pyo3's PanicException, a BaseException that ended the app
    # (the panic's own text on fd 2 kept off the terminal: the exception holds its reason)
    try:
        with captured():
            backend = Backend.from_str(text)
    except BaseException as e:
        if not isinstance(e, Exception) and type(e).__name__ != "PanicException":
            raise
        raise CheckpointError(
            f"cannot read {_shown(model_dir / TOKENIZER_JSON)}: {_first_line(e)}; the tokenizer files may be incomplete"
        ) from None
    _check_added_token_ids(model_dir / TOKENIZER_JSON, text, backend)
    _check_step_count(model_dir / TOKENIZER_JSON, backend)
    _check_word_length(model_dir / TOKENIZER_JSON, backend)
    _check_piece_length(model_dir / TOKENIZER_JSON, backend)
    _check_text_growth(model_dir / TOKENIZER_JSON, backend)
    config = _read_config(model_dir)
    declared = _declared_added_tokens(model_dir, config)  # checked and sorted once: up to ~60,000 entries
    _check_added_token_bytes(model_dir / TOKENIZER_CONFIG, _config_token_contents(config, declared))
    added_by_file = backend.get_added_tokens_decoder()  # tokenizer.json's own, before the config adds any

    def is_plain_word(token: str) -> bool:
        token_id = backend.token_to_id(token)
        return token_id is not None and token_id not in added_by_file

    _refuse_words_made_special(model_dir, config, is_plain_word)

    special: set[int] = set()
    # Added tokens declared only in tokenizer_config.json are added, at the ids it declares
    # (transformers does the same); a token already there keeps its id and takes the declared kind.
    # They are added in one call, in id order (each takes the next id): one call per token rebuilt
    # the backend's matcher every time, so 8,000 of them took a minute and 60,000 hours.
    new: dict[str, AddedToken] = {}
    for _, entry in declared:
        content = entry["content"]
        if content not in new and backend.token_to_id(content) is None:
            is_special = bool(entry.get("special", False))
            new[content] = AddedToken(
                content,
                single_word=bool(entry.get("single_word", False)),
                lstrip=bool(entry.get("lstrip", False)),
                rstrip=bool(entry.get("rstrip", False)),
                normalized=bool(entry.get("normalized", not is_special)),
                special=is_special,  # add_tokens keeps the kind
            )
    if new:
        backend.add_tokens(list(new.values()))
    for token_id, entry in declared:
        known = backend.token_to_id(entry["content"])
        if known != token_id:
            raise _config_error(model_dir, f"it gives {brief_repr(entry['content'])} the id {token_id}, tokenizer.json {known}")
        if entry.get("special", False):
            special.add(token_id)

    for token in backend.get_added_tokens_decoder().items():
        token_id, added = token
        if added.special:
            special.add(int(token_id))
    named = list(dict.fromkeys(content for _, content in _named_special_tokens(config)))
    lacking = [content for content in named if backend.token_to_id(content) is None]
    if lacking:  # transformers adds a named special token it lacks; all at once, as above
        backend.add_special_tokens([AddedToken(content, special=True, normalized=False) for content in lacking])
    special.update(backend.token_to_id(content) for content in named)
    special.update(i for i in map(backend.token_to_id, _SPECIAL_TEXT.values()) if i is not None)
    _mark_special(backend, special)
    tokenizer = FastTokenizer(backend, frozenset(special))
    _check_round_trip(tokenizer, _shown(model_dir / TOKENIZER_JSON))
    return tokenizer


def named_tokens(model_dir: str | Path, fields: Sequence[str] = ("bos_token", "eos_token", "pad_token"),
                 ) -> dict[str, str | None]:  # fmt: skip
    """The special tokens tokenizer_config.json names in `fields` ({field: token}, None where it names
    none): what transformers' tokenizer reports as its eos_token and others (the server's /tokenizer_info)."""
    named = dict(_named_special_tokens(_read_config(Path(model_dir))))
    return {field: named.get(field) for field in fields}


def _named_special_tokens(config: dict) -> list[tuple[str, str]]:
    """(field, token) of each special token tokenizer_config.json names: eos_token and the other
    named ones, then additional_special_tokens and transformers 5's extra_special_tokens (both where
    both are given: transformers 5 makes the tokens of each special; the second went unread)."""
    named = [(name, _token_content(config.get(name))) for name in _NAMED_SPECIALS]
    for key in ("additional_special_tokens", "extra_special_tokens"):
        extra = config.get(key) or []
        if isinstance(extra, dict):  # transformers 5 may store {name: token}
            extra = list(extra.values())
        named += [(key, _token_content(t)) for t in extra] if isinstance(extra, list) else []
    return [(name, content) for name, content in named if content is not None]


def _refuse_words_made_special(model_dir: Path, config: dict, is_plain_word: Callable[[str], bool]) -> None:
    """Refuse a tokenizer_config.json that makes an ordinary word of the vocabulary (not one of the
    tokenizer's added tokens) special: its eos_token, say. A special token is never printed, so that
    word vanished from every answer without a word (transformers' generate, given that eos_token,
    also ends each answer there; the app stops at <|im_end|> and <|endoftext|> only, and does not
    read generation_config.json). The chat and image tokens are special whatever the files say
    (`_mark_special`): not counted."""
    marked = _named_special_tokens(config)
    marked += [("added_tokens_decoder", e["content"]) for _, e in _declared_added_tokens(model_dir, config) if e.get("special")]
    for field, token in marked:
        if token not in CHAT_TOKENS and is_plain_word(token):
            raise CheckpointError(
                f"{_shown(model_dir / TOKENIZER_CONFIG)} makes the ordinary word {brief_repr(token)} a special token "
                f"({field}), which would drop it from every answer; the file was edited or is not this model's "
                "(use the tokenizer files published with the model)"
            )


# What a tokenizer must give back unchanged when it encodes and then decodes it: words, spaces
# (leading, doubled, trailing), punctuation, digits, newlines and a tab, accented letters, CJK, an
# emoji, and the chat and image tokens typed as text. It is already in NFC (Qwen2's normalizer, which
# InternVL3 uses, changes none of it), and holds what the usual hand edits change: capitals (a
# Lowercase normalizer), "²", "ﬁ" and "…" (NFKC folds them), spaces (a decoder or pre-tokenizer that
# drops or strips them). It runs at every start: 0.1-0.25 ms on byte-level BPEs of 500 to 20,000
# entries (a word's merges are looked up, so the vocabulary's size barely counts).
ROUND_TRIP_PROBE = (
    " Hello, World! It's 3.14 (or 42%) -- \"quoted\" & <tag>;  x² ﬁne…\n"
    "\tcafé naïve Straße Ωmega Ελλάδα\n世界你好 こんにちは 🤖\n\n"
    "<|im_start|>user\n<img><IMG_CONTEXT></img>?<|im_end|><|endoftext|>  "
)


def _check_round_trip(tokenizer: Tokenizer, source: str) -> None:
    """Refuse a tokenizer that does not give the probe text back as it was: a normalizer, pre-tokenizer
    or decoder edited by hand (one that drops spaces, lowercases, NFKC-folds), an added token that
    swallows the space before it, garbled every prompt and answer without a word. `source`: the file
    or folder to name, already made visible."""
    try:
        # decode opens no fd 2 window of its own (answers decode each token), but a decoder's Replace
        # may be a regex too: its panic's backtrace stays off the terminal here
        with captured():
            decoded = tokenizer.decode(tokenizer.encode(ROUND_TRIP_PROBE))
    except TokenizerPanic as e:  # its message is for text typed in a conversation: none was
        raise CheckpointError(
            f"{source} fails on ordinary text ({e.reason}); it is damaged or not InternVL's: re-download the tokenizer files"
        ) from None
    if decoded == ROUND_TRIP_PROBE:
        return
    at = next((i for i, (a, b) in enumerate(zip(ROUND_TRIP_PROBE, decoded)) if a != b), min(len(decoded), len(ROUND_TRIP_PROBE)))
    start = max(0, at - 8)
    raise CheckpointError(
        f"{source} does not give text back as it was (encoding and decoding {brief_repr(ROUND_TRIP_PROBE[start:at + 12])} "
        f"gave {brief_repr(decoded[start:at + 12])}), so every prompt and answer would be garbled: it was edited or is "
        "damaged; use the tokenizer files published with the model"
    )


def _mark_special(backend: Any, special: set[int]) -> None:
    """Every special token, the chat and image tokens among them whatever the file says, marked so
    in the backend, keeping its id: only marked tokens are kept from typed text. One tokenizer.json
    left unmarked (or a named eos_token it had as a plain one) was matched in a question, so
    "<IMG_CONTEXT>" broke the image-token count (a traceback) and "<|im_end|>" ended the turn (SPEC §3)."""
    from tokenizers import AddedToken

    added = backend.get_added_tokens_decoder()
    unmarked = [backend.id_to_token(i) for i in sorted(special) if i not in added or not added[i].special]
    if unmarked:
        backend.add_special_tokens([AddedToken(text, special=True, normalized=False) for text in unmarked if text])


# How many entries a tokenizer file may hold for a config.json vocab_size V: (what, the character
# each entry brings, entries allowed per id). Every entry of a JSON vocabulary object (BPE, WordPiece,
# WordLevel; vocab.json) is a member, with one ':' outside strings; a merge is a list item (an "a b"
# string, or an ["a", "b"] pair: two items), and so is a Unigram [piece, score] entry, each item but
# the last of its list followed by one ','; merges.txt has a line per merge. A ':' or ',' inside a
# string only adds to the counts, so they bound the entries from above, and take ~10 ms on a Qwen2
# file. Qwen2's (InternVL3's) has ~1.0 V members and ~3 V commas (151,643 entries, 151,387 pairs); a
# file of 2.4 million entries took 1.3 GB and 13 s to parse and build before its ids were found past V.
_ENTRY_COUNTS = {
    TOKENIZER_JSON: (("vocabulary entries", ":", 2), ("entries and merges", ",", 5)),
    "vocab.json": (("vocabulary entries", ":", 2),),
    "merges.txt": (("merges", "\n", 2),),
}
ENTRY_SLACK = 65_536  # added tokens (8 members each), tiny vocabularies, the rest of the file


def _check_entry_count(path: Path, content: str | bytes, vocab_size: int | None) -> None:
    """Refuse a tokenizer file with far more entries than the model has ids, before a parser reads
    it (its cost grows with the entries, not with the 64 MiB file limit)."""
    limit = vocab_size if vocab_size is not None else MAX_VOCAB
    source = f"config.json's vocab_size of {limit:,}" if vocab_size is not None else f"the largest vocabulary ({limit:,})"
    for what, separator, per_id in _ENTRY_COUNTS[path.name]:
        count = content.count(separator if isinstance(content, str) else separator.encode("ascii"))
        allowed = per_id * limit + ENTRY_SLACK
        if count > allowed:
            raise CheckpointError(
                f"{_shown(path)} holds up to {count:,} {what}, more than {source} allows ({allowed:,}); the tokenizer "
                "is damaged or belongs to another model (use the one shipped with the checkpoint)"
            )


# The patterns of tokenizer.json (a Split pre-tokenizer's, a Replace's: {"Regex": …} or {"String":
# …}, escaped into one) are compiled as it is parsed, at a cost the entry counts do not see: an
# alternation of 4 million words (30 MiB, two ':' and no ',' of its own) took 4.5 s and 1.2 GB, and
# the 64 MiB file limit allows twice that. Real ones are short: Qwen2's is ~100 characters; the
# limit is on all of them together.
MAX_PATTERN_CHARS = 65_536


def _json_key(word: str) -> str:
    """A regular expression for `word` as a JSON key, each letter as itself or as a \\u escape."""
    def escaped(char: str) -> str:
        return "\\\\u" + "".join(f"[{h}{h.upper()}]" if h.isalpha() else h for h in f"{ord(char):04x}")

    return '"' + "".join(f"(?:{char}|{escaped(char)})" for char in word) + '"'


_PATTERN_VALUE = re.compile(  # the value's characters as written (escapes count more)
    f'(?:{_json_key("Regex")}|{_json_key("String")})' + r'\s*:\s*"([^"\\]*(?:\\.[^"\\]*)*)"'
)


_ADDED_TOKENS_KEY = re.compile(_json_key("added_tokens") + r"\s*:\s*(?=\[)")

# The backend finds added tokens in text with an automaton built from their bytes, at ~73 bytes of
# memory per byte of their text: one added token of 20 MB took 1.4 GB as the file was parsed, and the
# 64 MiB file limit allowed ~5 GB. A tokenizer's are short: Qwen2's 22 and InternVL's 12 take ~400
# bytes, 60,000 tokens of a large vocabulary extension under 1 MiB. The limit is per file, on all
# of them together (one token of it: ~150 MB).
MAX_ADDED_TOKEN_BYTES = 2 << 20


def _check_added_token_bytes(path: Path, contents: Iterable[Any]) -> None:
    """Refuse a file whose added or special tokens are far longer than a tokenizer's, before the
    backend builds its matcher for them."""
    total = 0
    for content in contents:
        if isinstance(content, str):
            total += len(content.encode("utf-8", "surrogatepass"))
    if total > MAX_ADDED_TOKEN_BYTES:
        raise CheckpointError(
            f"{_shown(path)} declares added or special tokens of {total:,} bytes in all, more than a tokenizer's "
            f"({MAX_ADDED_TOKEN_BYTES:,} at most); the tokenizer is damaged or not a real one (use the one shipped with "
            "the checkpoint)"
        )


def _config_token_contents(config: dict, declared: list[tuple[int, dict]]) -> list[Any]:
    """The text of every token tokenizer_config.json declares or names: what transformers may add
    from it. More than the named ones the fast path adds: transformers 5 also adds the token of any
    "*_token" key (a model-specific one) and extra_special_tokens beside additional_special_tokens.
    `declared`: its added_tokens_decoder, as _declared_added_tokens reads it."""
    contents = [entry["content"] for _, entry in declared]
    named = [value for key, value in config.items() if key.endswith("_token")]
    for key in ("additional_special_tokens", "extra_special_tokens"):
        value = config.get(key)
        named += list(value.values()) if isinstance(value, dict) else value if isinstance(value, list) else []
    return contents + [value.get("content") if isinstance(value, dict) else value for value in named]


def _check_pattern_size(path: Path, text: str) -> None:
    """Refuse a tokenizer.json whose patterns are far longer than a tokenizer's, before the parser
    compiles them. A "Regex" key inside a string (a token) is escaped, and not matched."""
    total = 0
    for match in _PATTERN_VALUE.finditer(text):
        total += match.end(1) - match.start(1)
        if total > MAX_PATTERN_CHARS:
            raise CheckpointError(
                f"{_shown(path)} holds regular expressions of over {MAX_PATTERN_CHARS:,} characters (a tokenizer's are a "
                "few hundred); the tokenizer is damaged or not a real one (use the one shipped with the checkpoint)"
            )


def _check_added_token_ids(path: Path, text: str, backend: Any) -> None:
    """Every added token of tokenizer.json must have the id the file gives it. The backend ignores
    those ids: it numbers the added tokens one after another, so a token missing from the list or
    an id skipped or repeated moved every token after it (`<IMG_CONTEXT>`, `<|im_end|>`) onto
    another embedding row, and the model was prompted with the wrong ids without a word."""
    for declared, content in _declared_added_ids(text):
        if not isinstance(content, str) or isinstance(declared, bool) or not isinstance(declared, int):
            continue  # the backend has already refused what it cannot read
        actual = backend.token_to_id(content)
        if actual != declared:
            raise CheckpointError(
                f"{_shown(path)} gives {brief_repr(content)} the id {declared}, but its tokens put it at {actual}; "
                "the file is damaged or was edited (re-download the tokenizer files)"
            )


# Normalizers and decoders that insert text (Prepend, Replace) multiply what they are given, and in
# a Sequence their factors multiply: a tokenizer.json that put 4 MiB in place of each "h" took 2 GB
# for the first prompt, one that prepended 30 MiB more than 5 GB. Those that insert anything insert
# a "▁" or a space (Qwen2's, which InternVL3 uses, insert nothing).
# A SentencePiece "Precompiled" normalizer multiplies text too: its charsmap puts one of its pool's
# strings in place of each character (or short grapheme) it has a rule for, and a string may be as
# long as the file allows. Its factor is its longest string: 18 characters (for U+FDFA) in one built
# from Unicode's NFKC, and an ALBERT-style Sequence (two one-character Replaces before it) counts
# 2 × 2 × 18 = 72 by this worst-case product. The limit passes those and stops the hostile ones,
# whose factors run to millions. The other normalizers (NFC, NFKC, Lowercase...) grow text by
# Unicode's bounded factors at most and are not counted.
MAX_TEXT_GROWTH = 128
# a UTF-8 continuation byte: what a string's bytes have beyond one per character
_CONTINUATION_BYTES = bytes(range(0x80, 0xC0))


# A WordPiece model matches each word greedily, longest piece first: its cost grows with the cube
# of a word's length (a word of 8,000 characters took 10 s, of 30,000 ~10 minutes) up to
# max_input_chars_per_word, past which the word is one unknown token. BERT's and transformers' is 100.
MAX_WORDPIECE_WORD_CHARS = 256


def _check_word_length(path: Path, backend: Any) -> None:
    longest = getattr(backend.model, "max_input_chars_per_word", None)
    if type(backend.model).__name__ == "WordPiece" and isinstance(longest, int) and longest > MAX_WORDPIECE_WORD_CHARS:
        raise CheckpointError(
            f"the WordPiece model of {_shown(path)} reads words of up to {longest:,} characters (a tokenizer's: 100; "
            f"{MAX_WORDPIECE_WORD_CHARS} at most), which makes a long word take minutes to encode; the file is damaged "
            "or not InternVL's (re-download the tokenizer files)"
        )


# A Unigram model tries, at each character, every piece that begins there: a run of text matching
# pieces of up to L characters costs L lattice nodes a character (pieces "q" … 2,000 "q"s: 20,000
# "q"s took 9 s; a file of pieces up to 8,000 long, minutes for a paste). SentencePiece's trainer
# makes pieces of 16 characters unless told otherwise, 512 at most.
MAX_UNIGRAM_PIECE_CHARS = 512


def _check_piece_length(path: Path, backend: Any) -> None:
    if type(backend.model).__name__ != "Unigram":
        return
    added = {token.content for token in backend.get_added_tokens_decoder().values()}  # matched apart, not in the lattice
    longest = max((len(piece) for piece in backend.get_vocab(with_added_tokens=False) if piece not in added), default=0)
    if longest > MAX_UNIGRAM_PIECE_CHARS:
        raise CheckpointError(
            f"the Unigram model of {_shown(path)} has a piece of {longest:,} characters (a tokenizer's: 16 or so; "
            f"{MAX_UNIGRAM_PIECE_CHARS} at most), which makes repetitive text take minutes to encode; the file is damaged "
            "or not InternVL's (re-download the tokenizer files)"
        )


# Each step of a normalizer, pre-tokenizer or decoder runs over all the text it is given, and a
# Sequence may list as many as the entry counts allow: 60,000 NFC steps (1 MB) took 12 s to encode
# 10,000 characters, and a tokenizer of Qwen2's size has room for ~300,000. A tokenizer's take a few:
# Qwen2's one normalizer and one pre-tokenizer, SentencePiece-style ones up to 4 or 5.
MAX_PIPELINE_STEPS = 64
_SEQUENCE_KEYS = ("normalizers", "pretokenizers", "decoders")


def _check_step_count(path: Path, backend: Any) -> None:
    for part in ("normalizer", "pre_tokenizer", "decoder"):
        component = getattr(backend, part)
        steps = _step_count(json.loads(component.__getstate__())) if component is not None else 0
        if steps > MAX_PIPELINE_STEPS:
            raise CheckpointError(
                f"the {part.replace('_', '-')} of {_shown(path)} has {steps:,} steps, more than a tokenizer's ({MAX_PIPELINE_STEPS} "
                "at most), each run over every prompt; the file is damaged or not InternVL's (re-download the tokenizer files)"
            )


def _step_count(node: Any) -> int:
    """How many steps a normalizer, pre-tokenizer or decoder (its JSON) runs: a Sequence's own, nested
    ones counted through (the parser allows 128 levels)."""
    if not isinstance(node, dict):
        return 1
    steps = next((node[key] for key in _SEQUENCE_KEYS if isinstance(node.get(key), list)), None)
    return 1 if steps is None else sum(map(_step_count, steps))


def _check_text_growth(path: Path, backend: Any) -> None:
    for part, component in (("normalizer", backend.normalizer), ("decoder", backend.decoder)):
        if component is None:
            continue
        growth = _text_growth(json.loads(component.__getstate__()))
        if growth > MAX_TEXT_GROWTH:
            raise CheckpointError(
                f"the {part} of {_shown(path)} can make text more than {MAX_TEXT_GROWTH} times longer (a factor of "
                f"{growth:,}), which no tokenizer needs; the file is damaged or not InternVL's (re-download the tokenizer files)"
            )


def _text_growth(node: Any) -> int:
    """At most how many times longer a normalizer or decoder (its JSON) makes text: a Replace or a
    Prepend 1 + the length of what it inserts, a Sequence the product of its steps (counted only
    until it is over the limit: 1,000 doublings are a 300-digit number)."""
    if not isinstance(node, dict):
        return 1
    kind = node.get("type")
    if kind == "Sequence":
        growth = 1
        for step in node.get("normalizers") or node.get("decoders") or []:
            growth *= _text_growth(step)
            if growth > MAX_TEXT_GROWTH:
                break
        return growth
    if kind == "Precompiled":
        return _charsmap_growth(node.get("precompiled_charsmap"))
    inserted = {"Replace": node.get("content"), "Prepend": node.get("prepend")}.get(kind)
    return 1 + len(inserted) if isinstance(inserted, str) else 1


def _charsmap_growth(charsmap: Any) -> int:
    """The longest string, in characters, of a SentencePiece charsmap's pool (base64 of: the trie's
    size in bytes as a little-endian u32, the trie, then the NUL-terminated strings the trie's
    values point into): each character or short grapheme becomes at most that. The backend has
    parsed it already; 1 where it is not what it should be."""
    try:
        blob = base64.b64decode(charsmap, validate=True) if isinstance(charsmap, str) else b""
    except (binascii.Error, ValueError):
        return 1
    if len(blob) < 4:
        return 1
    pool = blob[4 + int.from_bytes(blob[:4], "little"):]
    return max((len(piece.translate(None, _CONTINUATION_BYTES)) for piece in pool.split(b"\0")), default=1) or 1


def _added_token_lists(text: str) -> Iterator[list[tuple[Any, Any]]]:
    """Each list of objects that follows an `"added_tokens":` key of tokenizer.json, as (id, content)
    pairs, decoded without the rest of the file (a Qwen2 vocabulary and merges: ~7 MiB the backend
    parses on its own). Inside a JSON string a quote is escaped, so such a key is no token's text;
    the key may be spelled with \\u escapes, which the backend reads as the same key."""
    def id_and_content(pairs: list[tuple[str, Any]]) -> tuple[Any, Any]:
        entry = dict(pairs)
        return entry.get("id"), entry.get("content")

    decoder = json.JSONDecoder(object_pairs_hook=id_and_content)
    for key in _ADDED_TOKENS_KEY.finditer(text):
        try:
            value, _ = decoder.raw_decode(text, key.end())
        except (ValueError, RecursionError):
            continue
        if all(isinstance(entry, tuple) for entry in value):
            yield value


def _declared_added_ids(text: str) -> list[tuple[Any, Any]]:
    """(id, content) of each entry of tokenizer.json's top-level `added_tokens`; [] where there is none."""
    return next(_added_token_lists(text), [])


def _added_token_entries(text: str) -> Iterator[tuple[Any, Any]]:
    """(id, content) of the entries of every `added_tokens` list of tokenizer.json: at least the top-level one's."""
    for entries in _added_token_lists(text):
        yield from entries


def _declared_added_tokens(model_dir: Path, config: dict) -> list[tuple[int, dict]]:
    """tokenizer_config.json's `added_tokens_decoder` as (id, entry) pairs in id order, each checked."""
    declared = config.get("added_tokens_decoder") or {}
    if not isinstance(declared, dict):
        raise _config_error(model_dir, "added_tokens_decoder is not an object")
    entries: list[tuple[int, dict]] = []
    for key, entry in declared.items():
        # an id int() reads: ASCII digits only ("²".isdigit() is true), and short enough to convert
        if not (isinstance(key, str) and key.isascii() and key.isdigit() and len(key) <= 18
                and isinstance(entry, dict) and _token_content(entry)):  # fmt: skip
            shown = key if len(key) <= 20 else key[:17] + "…"
            raise _config_error(model_dir, f"added_tokens_decoder entry {shown!r} is malformed")
        _check_token_fields(model_dir, TOKENIZER_CONFIG, f"added_tokens_decoder entry {key!r}", entry, _ADDED_TOKEN_FIELDS)
        entries.append((int(key), entry))
    return sorted(entries, key=lambda e: e[0])


def _check_token_fields(model_dir: Path, name: str, where: str, token: Any, fields: frozenset[str]) -> None:
    """A token object with a key AddedToken does not take (see _ADDED_TOKEN_FIELDS), or a flag that
    is not true or false, is refused before a token is built from it. Python's truth made
    "lstrip": "false" true, so the token swallowed the space before it (transformers refuses the
    file, in the words of pyo3's type check)."""
    if not isinstance(token, dict):
        return
    unknown = next((key for key in token if key not in fields), None)
    if unknown is not None:
        raise _config_error(model_dir, f"{where} has the unknown field {brief_repr(unknown)}", name)
    flag = next((key for key in _ADDED_TOKEN_FLAGS if key in token and not isinstance(token[key], bool)), None)
    if flag is not None:
        raise _config_error(model_dir, f"{where} has {flag} {shown_json(token[flag])}, not true or false", name)


def _check_special_tokens_map(model_dir: Path) -> None:
    """special_tokens_map.json's token objects (the legacy file transformers reads where
    tokenizer_config.json declares no added tokens), checked as tokenizer_config.json's are."""
    tokens = _read_config(model_dir, _SPECIAL_TOKENS_MAP)
    listed = [(key, token) for key, value in tokens.items() for token in (value if isinstance(value, list) else [value])]
    for key, token in listed:
        _check_token_fields(model_dir, _SPECIAL_TOKENS_MAP, brief_repr(key), token, _ADDED_TOKEN_FIELDS)
    # the raw content, not _token_content's: a token with a lone surrogate is text to this count too
    contents = (token.get("content") if isinstance(token, dict) else token for _, token in listed)
    _check_added_token_bytes(model_dir / _SPECIAL_TOKENS_MAP, contents)
    # added_tokens.json: {token: id}, which transformers adds too
    _check_added_token_bytes(model_dir / "added_tokens.json", _read_config(model_dir, "added_tokens.json"))


def _check_for_transformers(model_dir: Path) -> None:
    """What transformers would report in its own internals' words, said in ours first: a BPE
    vocabulary without its merges (or the reverse), and tokenizer_config.json fields of the wrong
    type ("'list' object has no attribute 'get'")."""
    pair = ("vocab.json", "merges.txt")
    present = [name for name in pair if os.path.lexists(model_dir / name)]
    if len(present) == 1:
        missing = pair[1 - pair.index(present[0])]
        raise CheckpointError(
            f"{_shown(model_dir)} has {present[0]} but no {missing}; the tokenizer files are incomplete (re-download them)"
        )
    if not present:  # tokenizer.model alone: Qwen2's classes cannot read it, and transformers then said
        # "`tiktoken` is required to read a `tiktoken` file. Install it", which no install fixes
        raise CheckpointError(
            f"{_shown(model_dir)} has tokenizer.model but neither tokenizer.json nor vocab.json and merges.txt, which "
            "InternVL3's Qwen2 tokenizer reads; use the tokenizer files shipped with the checkpoint"
        )
    if not os.path.lexists(model_dir / TOKENIZER_CONFIG):
        return
    config = _read_config(model_dir)
    named_class = config.get("tokenizer_class")
    if not isinstance(named_class, (str, type(None))):
        raise _config_error(model_dir, "tokenizer_class is not a name")
    if named_class is not None and named_class not in QWEN2_TOKENIZER_CLASSES:
        # here the class decides how vocab.json and merges.txt are read: another one loads without
        # a word and then encodes wrongly (BertTokenizer: every word unknown; LlamaTokenizer: nothing)
        raise CheckpointError(
            f"{_shown(model_dir / TOKENIZER_CONFIG)} names the tokenizer class {brief_repr(named_class)}, but InternVL3's Qwen2 "
            "language model needs Qwen2Tokenizer; use the tokenizer files shipped with the checkpoint"
        )
    declared = _declared_added_tokens(model_dir, config)
    _check_added_token_bytes(model_dir / TOKENIZER_CONFIG, _config_token_contents(config, declared))
    for name in _NAMED_SPECIALS:
        value = config.get(name)
        if value is not None and not _token_content(value):  # "" too: transformers' encode recursed forever
            raise _config_error(model_dir, f"{name} is not a token")
        _check_token_fields(model_dir, TOKENIZER_CONFIG, name, value, _ADDED_TOKEN_FIELDS | {"__type"})
    for name in ("additional_special_tokens", "extra_special_tokens"):
        value = config.get(name) or []
        tokens = list(value.values()) if isinstance(value, dict) else value
        if not isinstance(tokens, list) or not all(_token_content(t) for t in tokens):
            raise _config_error(model_dir, f"{name} is not a list of tokens")
        for token in tokens:
            _check_token_fields(model_dir, TOKENIZER_CONFIG, name, token, _ADDED_TOKEN_FIELDS)
    _check_special_tokens_map(model_dir)


def _read_config(model_dir: Path, name: str = TOKENIZER_CONFIG) -> dict:
    path = model_dir / name
    if not os.path.lexists(path):  # a folder, a FIFO or a broken link is named by the reader, not taken for none
        return {}
    try:
        config = json.loads(read_text_file(path, "the tokenizer config", TEXT_LIMIT, CheckpointError))  # as config.json
    except json.JSONDecodeError as e:
        raise _config_error(model_dir, f"it is not valid JSON ({e.msg} at line {e.lineno})", name) from None
    except (ValueError, RecursionError) as e:  # a number too long for int(), absurd nesting
        reason = "it is nested too deeply" if isinstance(e, RecursionError) else "a number in it is too large"
        raise _config_error(model_dir, reason, name) from None
    if not isinstance(config, dict):
        raise _config_error(model_dir, "it is not a JSON object", name)
    return config


def _config_error(model_dir: Path, why: str, name: str = TOKENIZER_CONFIG) -> CheckpointError:
    return CheckpointError(f"{_shown(model_dir / name)} is not usable: {why}; re-download the tokenizer files")


def _load_with_transformers(model_dir: Path, vocab_size: int | None) -> TransformersTokenizer:
    vocabulary = b"{}"
    for name in (*_SLOW_FILES, *_SLOW_EXTRAS):  # transformers reads them with no limit: check them as ours first
        if os.path.lexists(model_dir / name):
            data = read_bytes_file(model_dir / name, "the tokenizer file", JSON_LIMIT, CheckpointError)
            if name in _ENTRY_COUNTS:
                _check_entry_count(model_dir / name, data, vocab_size)
            if name == "vocab.json":
                vocabulary = data
    _check_for_transformers(model_dir)
    words = _plain_words(vocabulary)
    _refuse_shared_ids(model_dir / "vocab.json", words)
    _refuse_words_made_special(model_dir, _read_config(model_dir), words.__contains__)
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    # reading an original-layout config.json makes transformers warn about the unknown model type,
    # and long prompts make it warn about model_max_length: neither concerns the user
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        hf = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=False, local_files_only=True)
    except Exception as e:  # transformers raises OSError, ValueError, KeyError… for broken folders
        if not os.path.lexists(model_dir / TOKENIZER_CONFIG):  # it then cannot tell which tokenizer to build
            raise CheckpointError(
                f"cannot load the tokenizer in {_shown(model_dir)}: it has no {TOKENIZER_CONFIG}; the tokenizer files are "
                "incomplete (re-download them)"
            ) from None
        if _read_config(model_dir).get("tokenizer_class") is None and not _class_from_config_json(model_dir):
            # it said "Couldn't instantiate the backend tokenizer from one of: "
            raise CheckpointError(
                f"cannot load the tokenizer in {_shown(model_dir)}: its {TOKENIZER_CONFIG} names no tokenizer_class, so "
                'transformers cannot tell how to read vocab.json and merges.txt; add "tokenizer_class": "Qwen2Tokenizer" '
                "to it (InternVL3's) or use the tokenizer files shipped with the checkpoint"
            ) from None
        raise CheckpointError(
            f"cannot load the tokenizer in {_shown(model_dir)}: {_first_line(e)}; the tokenizer files may be incomplete"
        ) from None
    finally:
        hf_logging.set_verbosity(verbosity)
    hf.model_max_length = int(1e30)  # the app checks lengths itself (the context budget)
    # the chat and image tokens kept from typed text whatever tokenizer_config.json says (as
    # `_mark_special` does): transformers 5 matches a plain added token even with split_special_tokens
    present = [text for text in _SPECIAL_TEXT.values() if TransformersTokenizer(hf).convert_tokens_to_ids(text) is not None]
    if present:
        from tokenizers import AddedToken

        hf.add_tokens([AddedToken(text, special=True, normalized=False) for text in present], special_tokens=True)
    tokenizer = TransformersTokenizer(hf)
    _check_round_trip(tokenizer, f"the tokenizer in {_shown(model_dir)}")
    return tokenizer


def _class_from_config_json(model_dir: Path) -> bool:
    """Whether transformers could tell the tokenizer class from config.json, with none in
    tokenizer_config.json: its tokenizer_class, or a model_type transformers maps to one (an -hf
    config's "internvl"; an original one's "internvl_chat" it does not know). Then its failure has
    another cause, named in its own words."""
    from transformers.models.auto.tokenization_auto import TOKENIZER_MAPPING_NAMES

    try:
        config = _read_config(model_dir, "config.json")
    except CheckpointError:
        return False
    names = TOKENIZER_MAPPING_NAMES.get(config.get("model_type")) if isinstance(config.get("model_type"), str) else None
    known = any(names) if isinstance(names, tuple) else names is not None  # transformers 4: (slow, fast) names
    return known or isinstance(config.get("tokenizer_class"), str)


def _plain_words(vocabulary: bytes) -> dict[str, Any]:
    """The entries of vocab.json, word to id, in the file's order (the BPE's own words: the added
    tokens are tokenizer_config.json's); none where it cannot be read (transformers then says why)."""
    try:
        words = json.loads(vocabulary)
    except (ValueError, RecursionError):
        return {}
    return words if isinstance(words, dict) else {}


def _refuse_shared_ids(path: Path, words: Mapping[str, Any]) -> None:
    """Two words of vocab.json with one id, named before transformers builds the tokenizer: it then
    decodes the id as one of them, and which one depended on the hash seed, so the round-trip probe
    refused the file in vaguer words at some starts and not at others. The first id met twice in the
    file's order, so the message is the same at every start."""
    first: dict[int, str] = {}
    for word, token_id in words.items():
        if not isinstance(token_id, int) or isinstance(token_id, bool):  # transformers names a wrong type
            continue
        if token_id in first:
            raise CheckpointError(
                f"{_shown(path)} gives the id {token_id} to both {brief_repr(first[token_id])} and {brief_repr(word)}; "
                "the tokenizer files are damaged (re-download them)"
            )
        first[token_id] = word


def _first_line(e: BaseException) -> str:
    """A library's reason, short and inert: the JSON parser quotes the offending value whole (a
    100,000-character string made a 100,000-character error line, escape sequences and all)."""
    text = str(e).strip().splitlines()
    line = visible(text[0] if text else type(e).__name__)
    return line if len(line) <= 120 else line[:117] + "…"


def _shown(path: Path) -> str:
    return visible(str(path))


# -------------------------------------------------------------------------------- special ids


@dataclass(frozen=True)
class SpecialTokens:
    im_start: int
    im_end: int
    endoftext: int
    img_start: int
    img_end: int
    img_context: int


_SPECIAL_TEXT = {
    "im_start": "<|im_start|>",
    "im_end": "<|im_end|>",
    "endoftext": "<|endoftext|>",
    "img_start": "<img>",
    "img_end": "</img>",
    "img_context": "<IMG_CONTEXT>",
}
CHAT_TOKENS = frozenset(_SPECIAL_TEXT.values())  # the tokens a prompt is built of


def special_token_ids(tokenizer: Any) -> SpecialTokens:
    """Look up the ids of the chat and image tokens; a CheckpointError names any that is missing."""
    vocab = tokenizer.get_vocab()
    missing = [text for text in _SPECIAL_TEXT.values() if text not in vocab]
    if missing:
        raise CheckpointError(
            f"the tokenizer lacks {', '.join(missing)}; use the tokenizer shipped with the InternVL3 checkpoint"
        )
    return SpecialTokens(**{field: int(vocab[text]) for field, text in _SPECIAL_TEXT.items()})
