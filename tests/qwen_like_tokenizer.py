"""A small byte-level BPE with Qwen2's pre-tokenizer split and the InternVL special tokens.

Tests that care how text pieces merge (templates, streaming detokenisation) train one on their own
corpus with `build_qwen_like_tokenizer`. `redos_pre_tokenizer` makes a tokenizer.json's encoding panic.
"""

from __future__ import annotations

from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from make_tiny_checkpoint import fast_tokenizer_class

# Qwen2's pre-tokenizer split (a fact of its tokenizer.json), followed by byte-level mapping: it
# merges runs of newlines and spaces, so tokenizing template pieces separately would give other ids
QWEN_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>"]


def build_qwen_like_tokenizer(
    corpus: list[str], vocab_size: int, specials: list[str] = SPECIALS, pad_token: str | None = None
) -> Any:
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    extra = {"pad_token": pad_token} if pad_token else {}
    return fast_tokenizer_class()(tokenizer_object=tok, eos_token="<|im_end|>", **extra)


def redos_pre_tokenizer(byte_level: dict) -> dict:
    """A tokenizer.json pre-tokenizer whose first step, a Split regex, backtracks past Oniguruma's
    limit on "aaa…!" (the backend panics), followed by the file's own byte-level one (`byte_level`):
    the text then still round-trips, as the loader checks, and the tokenizer loads."""
    redos = {"type": "Split", "pattern": {"Regex": "(a+)+$"}, "behavior": "Isolated", "invert": False}
    return {"type": "Sequence", "pretokenizers": [redos, byte_level]}
