"""Streaming detokenisation against the tokenizer's own decode of the whole answer."""

from __future__ import annotations

from typing import Any

import pytest

from qwen_like_tokenizer import build_qwen_like_tokenizer as build_tokenizer
from internvl_chat.chat.detokenize import IncrementalDetokenizer

CORPUS = [
    "Hello world, this is a picture of a cat.\n\nThe answer is 42.",
    "你好，世界！这是一只猫。图片中有一个苹果。",
    "  indented\n    code\n\n\n",
    "Emoji 😀 are fun.",
] * 3

# Chinese, emoji (incl. a ZWJ sequence, a flag and a skin tone), accents, Cyrillic and newlines;
# several of these characters are not in the training corpus, so they split across byte tokens.
ANSWER = (
    "Hello! 你好，世界！这是一只猫🐱。 The fox 🦊 and the robot 🤖 "
    "are friends 👩‍👩‍👧 🇨🇭 👍🏽.\n\n"
    "Naïve café — Ёжик в тумане. 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ∑ x² ≠ y³ … "
    "图片中有一个苹果。 The answer is 42."
)


def build_qwen_like_tokenizer() -> Any:
    return build_tokenizer(CORPUS, 400, pad_token="<|endoftext|>")


@pytest.fixture(scope="module")
def qwen_like_tokenizer() -> Any:
    return build_qwen_like_tokenizer()


class CountingTokenizer:
    """Wraps a tokenizer and records how many ids each decode() call received."""

    def __init__(self, inner: Any):
        self.inner = inner
        self.calls: list[int] = []

    def decode(self, ids: list[int], **kwargs: Any) -> str:
        self.calls.append(len(ids))
        return self.inner.decode(ids, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def stream(detok: IncrementalDetokenizer, ids: list[int]) -> list[str]:
    chunks = [detok.push(i) for i in ids]
    return [*chunks, detok.flush()]


def encode(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


def test_the_answer_really_splits_characters(tokenizer: Any) -> None:
    ids = encode(tokenizer, ANSWER)
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)  # otherwise the test proves nothing


def test_stream_reassembles_exactly(tokenizer: Any) -> None:
    ids = encode(tokenizer, ANSWER)
    chunks = stream(IncrementalDetokenizer(tokenizer), ids)
    assert "".join(chunks) == tokenizer.decode(ids) == ANSWER
    assert not any("\ufffd" in c for c in chunks)
    assert sum(1 for c in chunks if c) > len(ANSWER) // 4  # it really streams, not all at the end


def test_each_character_appears_as_soon_as_complete(tokenizer: Any) -> None:
    ids = encode(tokenizer, ANSWER)
    detok = IncrementalDetokenizer(tokenizer)
    printed = ""
    for n, token_id in enumerate(ids, start=1):
        printed += detok.push(token_id)
        whole = tokenizer.decode(ids[:n])
        # everything but a trailing incomplete character is already printed
        assert printed == whole.rstrip("\ufffd")


def test_decode_cost_is_bounded(tokenizer: Any) -> None:
    ids = encode(tokenizer, ANSWER * 4)
    counting = CountingTokenizer(tokenizer)
    detok = IncrementalDetokenizer(counting)
    text = "".join(stream(detok, ids))
    assert text == tokenizer.decode(ids)
    assert max(counting.calls) <= 12  # a small window, never the whole answer
    assert sum(counting.calls) <= 8 * len(ids)


def test_special_tokens_are_not_printed(tokenizer: Any) -> None:
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    img = tokenizer.convert_tokens_to_ids("<img>")
    text_ids = encode(tokenizer, "猫🦊 ok")
    ids = text_ids[:2] + [img] + text_ids[2:] + [im_end]
    chunks = stream(IncrementalDetokenizer(tokenizer), ids)
    assert "".join(chunks) == "猫🦊 ok"


def test_explicit_skip_ids(tokenizer: Any) -> None:
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    ids = encode(tokenizer, "a b") + [im_end]
    assert "".join(stream(IncrementalDetokenizer(tokenizer, skip_special_ids=()), ids)) == "a b<|im_end|>"


def byte_tokens(tokenizer: Any, ch: str) -> list[int]:
    ids = encode(tokenizer, ch)
    assert len(ids) == len(ch.encode()), "the character must not be a single token in this vocabulary"
    return ids


def test_invalid_bytes_are_printed_as_the_full_decode_does(tokenizer: Any) -> None:
    zhe = byte_tokens(tokenizer, "ж")  # two byte tokens: lead, continuation
    ids = [zhe[1]] + encode(tokenizer, " ok ") + [zhe[0]] + encode(tokenizer, "x") + [zhe[0]]
    expected = tokenizer.decode(ids)
    assert expected.count("\ufffd") == 3
    chunks = stream(IncrementalDetokenizer(tokenizer), ids)
    assert "".join(chunks) == expected


def test_long_invalid_run_does_not_grow_the_window(tokenizer: Any) -> None:
    cont = byte_tokens(tokenizer, "ж")[1]
    ids = [cont] * 50 + encode(tokenizer, "end")
    counting = CountingTokenizer(tokenizer)
    chunks = stream(IncrementalDetokenizer(counting), ids)
    assert "".join(chunks) == tokenizer.decode(ids)
    assert max(counting.calls) <= 20


def test_flush_returns_an_incomplete_tail(tokenizer: Any) -> None:
    fox = encode(tokenizer, "🦊")
    assert len(fox) >= 2
    detok = IncrementalDetokenizer(tokenizer)
    assert detok.push(encode(tokenizer, "a")[0]) == "a"
    assert [detok.push(i) for i in fox[:-1]] == [""] * (len(fox) - 1)
    assert detok.flush() == "\ufffd"
    assert detok.flush() == ""


@pytest.mark.parametrize("stray", [5, 6, 7, 20])
def test_a_character_after_a_run_of_invalid_bytes_is_printed_whole(tokenizer: Any, stray: int) -> None:
    """Stray bytes before an emoji: the run grew past MAX_PENDING_TOKENS while the emoji's first
    bytes had come, and they were printed with it as U+FFFD; the emoji never reached the screen
    (the stored answer, decoded whole, held it)."""
    cont = byte_tokens(tokenizer, "ж")[1]
    emoji = byte_tokens(tokenizer, "𝔘")  # four byte tokens
    ids = [cont] * stray + emoji + encode(tokenizer, " ok") + [cont] * stray + emoji
    chunks = stream(IncrementalDetokenizer(tokenizer), ids)
    assert "".join(chunks) == tokenizer.decode(ids)
    assert "".join(chunks).count("𝔘") == 2
