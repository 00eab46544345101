"""The app's tokenizer (engine/tokenizer.py) against transformers' AutoTokenizer on the same files.

`load_tokenizer` reads tokenizer.json with the `tokenizers` library so that starting the app does
not import transformers. These tests prove it changes nothing: over many strings (unicode,
whitespace, special-token text typed by a user) the ids and the decoded text are identical to
AutoTokenizer's as the app used it before (`split_special_tokens=True`: typed special-token text
stays text; non-special added tokens are matched, as transformers does), on the tiny test
tokenizer, the demo model's, and a Qwen2-style checkpoint folder written as real InternVL3 ones
are (tokenizer_config.json with added_tokens_decoder, one token declared only there).
"""

from __future__ import annotations

import base64
import json
import random
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from qwen_like_tokenizer import SPECIALS, build_qwen_like_tokenizer, redos_pre_tokenizer
from test_checkpoint import tokenizer_json_ids
from transformers import AutoTokenizer

from internvl_chat.chat.detokenize import IncrementalDetokenizer
from internvl_chat.chat.template import MediaSpec, PromptBuilder
from internvl_chat.engine.tokenizer import (
    MAX_ADDED_TOKEN_BYTES,
    MAX_PIPELINE_STEPS,
    MAX_UNIGRAM_PIECE_CHARS,
    MAX_WORDPIECE_WORD_CHARS,
    ROUND_TRIP_PROBE,
    FastTokenizer,
    TransformersTokenizer,
    _check_text_growth,
    load_tokenizer,
    special_token_ids,
)
from internvl_chat.errors import CheckpointError

REPO = Path(__file__).resolve().parent.parent
DEMO_MODEL = REPO / "internvl_chat" / "demo_model"
EXTRA_SPECIALS = ["<quad>", "</quad>", "<ref>", "</ref>"]
NOT_SPECIAL = "<tool_call>"  # Qwen2.5 has added tokens that are not special: transformers matches them in text
CONFIG_ONLY = "<box>"  # declared only in tokenizer_config.json's added_tokens_decoder

CORPUS = [
    "Describe the picture in detail. What colour is the star? How many shapes are there?",
    "A red circle on the left, a blue square at the top, and a green triangle.",
    "def main():\n    return 42\n\n\nprint('hello world')  # comment\r\n",
    "世界 你好 こんにちは 안녕하세요 Привет мир 123 4567 3.14 1,000,000",
    "emoji 🤖🎨👍🏽 and accents: café naïve über résumé e\u0301",
    "    indented\n\ttabbed\n\n\n   spaced   out   ",
] * 30

PIECES = [
    "<|im_end|>", "<|im_start|>", "<|endoftext|>", "<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "<box>",
    NOT_SPECIAL, "<|im_end", "im_end|>", "<im_end>", "<", "|", ">", "<<|im_start|>>",
    " ", "  ", "\n", "\n\n", "\r\n", "\t", "\u00a0", "\u200b", "\u200d", "\u202e", "\x00", "\x1b[31m",
    "hello", " world", "Describe", " the", " picture", "?", ".", "'s", "'ll", "123", "4567", "3.14",
    "世界", "你好", "é", "e\u0301", "🤖", "👍🏽", "🏳️‍🌈", "Привет", "مرحبا", "\ufffd", "\U0010ffff",
]  # fmt: skip


def sample_texts(n: int = 300, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    texts = [
        "",
        " ",
        "\n",
        "How many shapes are there?",
        "user\n<image>\nWhat is it?",
        "<|im_end|>\n<|im_start|>assistant\n",
        "   leading and trailing   ",
        "\n\n\n",
        NOT_SPECIAL + " call it " + NOT_SPECIAL,
        "".join(PIECES),
        CORPUS[3] + CORPUS[4],
    ]
    for _ in range(n):
        texts.append("".join(rng.choice(PIECES) for _ in range(rng.randint(1, 12))))
    for _ in range(n // 3):  # arbitrary code points, surrogates left out (not valid in UTF-8)
        chars = [chr(rng.choice([rng.randint(0x20, 0x7E), rng.randint(0xA0, 0xD7FF), rng.randint(0xE000, 0x10FFFF)]))
                 for _ in range(rng.randint(1, 10))]  # fmt: skip
        texts.append("".join(chars))
    return texts


# --- checkpoint-style tokenizer folders --------------------------------------------------------


def _write_qwen2_style(folder: Path, with_tokenizer_json: bool) -> Path:
    """A tokenizer folder laid out as InternVL3's: Qwen2 split, tokenizer_config.json in the
    transformers 4 format, extra special and non-special added tokens, one of them only in the config."""
    folder.mkdir(parents=True, exist_ok=True)
    hf = build_qwen_like_tokenizer(CORPUS, 420, SPECIALS + EXTRA_SPECIALS)
    backend = hf.backend_tokenizer
    from tokenizers import AddedToken

    backend.add_tokens([AddedToken(NOT_SPECIAL, special=False, normalized=False)])
    data = json.loads(backend.to_str())
    added = {t["content"]: t for t in data["added_tokens"]}
    config_only_id = max(t["id"] for t in data["added_tokens"]) + 1
    decoder = {
        str(t["id"]): {k: t[k] for k in ("content", "lstrip", "normalized", "rstrip", "single_word", "special")}
        for t in added.values()
    }
    decoder[str(config_only_id)] = {"content": CONFIG_ONLY, "lstrip": False, "normalized": False, "rstrip": False,
                                    "single_word": False, "special": True}  # fmt: skip
    config = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": decoder,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>", *EXTRA_SPECIALS, CONFIG_ONLY],
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 8192,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=1), encoding="utf-8")
    if with_tokenizer_json:
        (folder / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    else:  # the slow files only: vocab.json + merges.txt
        model = data["model"]
        (folder / "vocab.json").write_text(json.dumps(model["vocab"]), encoding="utf-8")
        merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
        (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def qwen2_style(tmp_path_factory) -> Path:
    return _write_qwen2_style(tmp_path_factory.mktemp("qwen2_style"), with_tokenizer_json=True)


@pytest.fixture(params=["tiny", "demo", "qwen2_style"])
def folder(request, tiny_tokenizer, qwen2_style) -> Path:
    return {"tiny": tiny_tokenizer, "demo": DEMO_MODEL, "qwen2_style": qwen2_style}[request.param]


def reference(folder: Path):
    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


# --- equivalence -------------------------------------------------------------------------------


def test_loaded_through_tokenizers_not_transformers(folder):
    assert isinstance(load_tokenizer(folder), FastTokenizer)


def test_ids_match_transformers_as_the_app_used_it(folder):
    ours, hf = load_tokenizer(folder), reference(folder)
    for text in sample_texts():
        expected = hf(text, add_special_tokens=False, split_special_tokens=True).input_ids
        assert ours.encode(text) == expected, repr(text)


def test_decoded_text_matches_transformers(folder):
    ours, hf = load_tokenizer(folder), reference(folder)
    for text in sample_texts(120, seed=1):
        ids = ours.encode(text)
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    rng = random.Random(2)
    size = len(hf)
    for _ in range(300):  # any id sequence, special ids and broken UTF-8 included
        ids = [rng.randrange(size) for _ in range(rng.randint(1, 8))]
        for skip in (False, True):
            assert ours.decode(ids, skip) == hf.decode(ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False), ids


def test_vocabulary_and_special_ids_match_transformers(folder):
    ours, hf = load_tokenizer(folder), reference(folder)
    assert len(ours) == len(hf)
    assert ours.get_vocab() == hf.get_vocab()
    assert ours.special_ids == TransformersTokenizer(hf).special_ids  # what the detokenizer never prints
    for token, token_id in hf.get_vocab().items():
        assert ours.convert_tokens_to_ids(token) == token_id
    assert ours.convert_tokens_to_ids("<no such token>") is None
    assert special_token_ids(ours) == special_token_ids(hf)


def test_prompts_and_streamed_answers_match_transformers(folder):
    ours, hf = load_tokenizer(folder), reference(folder)
    media = [MediaSpec("image", 2), MediaSpec("video", 2)]
    question = "What is <|im_end|> in 🤖 <img>?\n\n  Tell me."
    built = [PromptBuilder(tok, "You are helpful.", tokens_per_tile=4) for tok in (ours, hf)]
    assert built[0].first_turn(question, media) == built[1].first_turn(question, media)
    assert built[0].next_turn(question, []) == built[1].next_turn(question, [])
    assert built[0].stop_ids == built[1].stop_ids
    answer = ours.encode("Héllo wörld 世界 🤖! " * 3) + [built[0].im_end_id]
    streams = [IncrementalDetokenizer(tok) for tok in (ours, hf)]
    texts = ["".join(s.push(i) for i in answer) + s.flush() for s in streams]
    assert texts[0] == texts[1] == "Héllo wörld 世界 🤖! " * 3


def test_typed_special_token_text_stays_text_but_added_tokens_match(qwen2_style):
    ours = load_tokenizer(qwen2_style)
    specials = {ours.convert_tokens_to_ids(t) for t in ["<|im_end|>", "<IMG_CONTEXT>", CONFIG_ONLY]}
    assert not specials & set(ours.encode("<|im_end|><IMG_CONTEXT>" + CONFIG_ONLY))
    assert ours.encode(NOT_SPECIAL) == [ours.convert_tokens_to_ids(NOT_SPECIAL)]  # as transformers does
    assert ours.convert_tokens_to_ids(CONFIG_ONLY) in ours.special_ids


def test_without_tokenizer_json_transformers_is_the_fallback(tmp_path, qwen2_style):
    slow = _write_qwen2_style(tmp_path / "slow", with_tokenizer_json=False)
    fallback, fast = load_tokenizer(slow), load_tokenizer(qwen2_style)
    assert isinstance(fallback, TransformersTokenizer)
    for text in sample_texts(60, seed=3):
        assert fallback.encode(text) == fast.encode(text), repr(text)
    assert fallback.special_ids == fast.special_ids


def test_the_fallback_takes_the_fast_class_the_hf_layouts_name(tmp_path, qwen2_style):
    slow = _write_qwen2_style(tmp_path / "slow", with_tokenizer_json=False)
    config = json.loads((slow / "tokenizer_config.json").read_text(encoding="utf-8"))
    (slow / "tokenizer_config.json").write_text(json.dumps({**config, "tokenizer_class": "Qwen2TokenizerFast"}))
    fallback, fast = load_tokenizer(slow), load_tokenizer(qwen2_style)
    assert [fallback.encode(text) for text in sample_texts(20, seed=4)] == [fast.encode(text) for text in sample_texts(20, seed=4)]


def test_with_tokenizer_json_the_class_named_is_not_what_encodes(tmp_path, qwen2_style):
    # tokenizer.json holds the whole tokenizer: a generic or mislabelled class changes nothing, and
    # another model's tokenizer.json is refused for the tokens it lacks (special_token_ids)
    folder = tmp_path / "relabelled"
    folder.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((qwen2_style / name).read_bytes())
    config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "tokenizer_class": "BertTokenizer"}))
    relabelled, fast = load_tokenizer(folder), load_tokenizer(qwen2_style)
    assert [relabelled.encode(text) for text in sample_texts(20, seed=5)] == [fast.encode(text) for text in sample_texts(20, seed=5)]


@pytest.mark.parametrize("name", ["vocab.json", "merges.txt", "tokenizer_config.json"])
def test_the_fallback_reads_no_tokenizer_file_over_the_limit(tmp_path, name):
    """transformers reads the slow tokenizer files whole, with no limit: a 3 GB vocab.json took
    3.4 GB of memory before it failed. They are checked as every checkpoint file is, first."""
    slow = _write_qwen2_style(tmp_path / "slow", with_tokenizer_json=False)
    with open(slow / name, "r+b") as f:
        f.truncate(65 << 20)  # sparse: over the 64 MiB limit without using the disk
    with pytest.raises(CheckpointError, match=f"{name} is 65.0 MiB, over the 64 MiB limit"):
        load_tokenizer(slow)


SLOW_DAMAGE = {
    # a partial download: transformers said "`vocab` and `merges` must be both be from memory or both filenames"
    "no merges.txt": ({"merges.txt": None}, "has vocab.json but no merges.txt"),
    "no vocab.json": ({"vocab.json": None}, "has merges.txt but no vocab.json"),
    # transformers said to install tiktoken, which does not read it either
    "only tokenizer.model": ({"vocab.json": None, "merges.txt": None, "tokenizer.model": "\x00junk"},
                             "has tokenizer.model but neither tokenizer.json nor vocab.json and merges.txt"),
    # it said "Couldn't instantiate the backend tokenizer from one of: "
    "no tokenizer_config.json": ({"tokenizer_config.json": None}, "has no tokenizer_config.json"),
    # fields of the wrong type: "'list' object has no attribute 'get'", "Special token eos_token has to be …"
    "config a list": ({"tokenizer_config.json": "[]"}, "tokenizer_config.json is not usable: it is not a JSON object"),
    "class a number": ({"tokenizer_class": 5}, "tokenizer_class is not a name"),
    # transformers said "Couldn't instantiate the backend tokenizer from one of: " (config.json an original one)
    "no class": ({"tokenizer_class": None, "config.json": json.dumps({"model_type": "internvl_chat"})},
                 'names no tokenizer_class, so transformers cannot tell how to read vocab.json and merges.txt; add '
                 '"tokenizer_class": "Qwen2Tokenizer"'),
    # another model's class loaded silently and encoded wrongly: every word unknown, or nothing at all
    **{f"class {name}": ({"tokenizer_class": name}, f"names the tokenizer class '{name}', but InternVL3's Qwen2 "
                         "language model needs Qwen2Tokenizer; use the tokenizer files shipped with the checkpoint")
       for name in ("BertTokenizer", "LlamaTokenizer", "GPT2Tokenizer", "TokenizersBackend")},
    "added tokens a list": ({"added_tokens_decoder": [1]}, "added_tokens_decoder is not an object"),
    "an added token a text": ({"added_tokens_decoder": {"5": "x"}}, "added_tokens_decoder entry '5' is malformed"),
    "eos a number": ({"eos_token": 5}, "eos_token is not a token"),
    "eos an object without content": ({"eos_token": {"x": 1}}, "eos_token is not a token"),
    "unk empty": ({"unk_token": ""}, "unk_token is not a token"),  # transformers' encode then recursed forever
    "extra specials a number": ({"additional_special_tokens": 5}, "additional_special_tokens is not a list of tokens"),
    "extra specials of junk": ({"additional_special_tokens": [5, {"a": 1}]}, "additional_special_tokens is not a list"),
}  # fmt: skip


@pytest.mark.parametrize("case", SLOW_DAMAGE)
def test_damaged_slow_tokenizer_files_are_named_in_our_words(tmp_path, case):
    """Without tokenizer.json (the published InternVL3 folders) transformers reads the files; what
    it would say about a damaged or partial download is said first, naming the file and the field."""
    slow = _write_qwen2_style(tmp_path / "slow", with_tokenizer_json=False)
    change, words = SLOW_DAMAGE[case]
    config = json.loads((slow / "tokenizer_config.json").read_text(encoding="utf-8"))
    for name, value in change.items():
        if name.endswith((".json", ".txt", ".model")):
            (slow / name).unlink(missing_ok=True)
            if value is not None:
                (slow / name).write_text(value, encoding="utf-8")
        else:
            config[name] = value
            (slow / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    with pytest.raises(CheckpointError) as err:
        load_tokenizer(slow)
    text = str(err.value)
    assert words in text and str(slow) in text and "\n" not in text, text


@pytest.mark.parametrize("model_type", ["qwen2", "internvl"])
def test_without_tokenizer_class_a_failure_transformers_could_tell_the_class_for_keeps_its_reason(tmp_path, model_type):
    """A tokenizer_config.json naming no class is blamed only where config.json does not tell
    transformers the class either: with an -hf config.json's model_type it had picked Qwen2's, so a
    damaged merges.txt was reported as a missing tokenizer_class, a fix that fixes nothing."""
    slow = _write_qwen2_style(tmp_path / "slow", with_tokenizer_json=False)
    config = json.loads((slow / "tokenizer_config.json").read_text(encoding="utf-8"))
    (slow / "tokenizer_config.json").write_text(json.dumps({**config, "tokenizer_class": None}), encoding="utf-8")
    (slow / "config.json").write_text(json.dumps({"model_type": model_type}), encoding="utf-8")
    merges = (slow / "merges.txt").read_text(encoding="utf-8").splitlines()
    merges[5] = "one-piece"
    (slow / "merges.txt").write_text("\n".join(merges) + "\n", encoding="utf-8")
    with pytest.raises(CheckpointError) as err:
        load_tokenizer(slow)
    text = str(err.value)
    assert "Merges text file invalid" in text and "names no tokenizer_class" not in text, text


def test_two_words_of_vocab_json_with_one_id_are_refused_alike_at_every_start(tmp_path):
    """transformers decodes a shared id as one of its words, which one set by the hash seed: the
    round-trip probe then refused the folder at some starts, each time quoting other text, and the
    shared-id check at others. The shared id is named first, the same under every seed."""
    slow = _write_qwen2_style(tmp_path / "slow", with_tokenizer_json=False)
    vocab = json.loads((slow / "vocab.json").read_text(encoding="utf-8"))
    vocab["I"] = vocab["g"]  # both in the probe text ("It's", "<tag>")
    (slow / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    code = (
        "import sys\n"
        "from internvl_chat.engine.tokenizer import load_tokenizer\n"
        "from internvl_chat.errors import CheckpointError\n"
        "try:\n"
        "    load_tokenizer(sys.argv[1])\n"
        "except CheckpointError as e:\n"
        "    print(e)\n"
    )
    said = set()
    for seed in ("0", "1"):  # two seeds the round-trip probe told apart
        run = subprocess.run([sys.executable, "-c", code, str(slow)], capture_output=True, text=True, timeout=300, cwd=REPO,
                             env={"PATH": "/usr/bin:/bin", "PYTHONHASHSEED": seed, "HOME": "/nonexistent"})  # fmt: skip
        assert run.returncode == 0, run.stderr
        said.add(run.stdout.strip())
    assert said == {f"{slow / 'vocab.json'} gives the id {vocab['g']} to both 'I' and 'g'; the tokenizer files are damaged (re-download them)"}


JUNK_KEY = "\x1b[2Jx"  # a field AddedToken does not take, an escape sequence in its name


def _with_junk_key(folder: Path, where: str) -> str:
    """The file that gets a token object with JUNK_KEY in it (its name, for the error)."""
    config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    if where == "added_tokens_decoder":
        next(iter(config["added_tokens_decoder"].values()))[JUNK_KEY] = True
    elif where == "eos_token":  # the legacy form transformers turns into an AddedToken
        config["eos_token"] = {"__type": "AddedToken", "content": "<|im_end|>", JUNK_KEY: 1}
    else:  # special_tokens_map.json: read where tokenizer_config.json declares no added tokens
        del config["added_tokens_decoder"]
        (folder / where).write_text(json.dumps({"eos_token": {"content": "<|im_end|>", JUNK_KEY: 1}}), encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return where if where.endswith(".json") else "tokenizer_config.json"


@pytest.mark.parametrize("where", ["added_tokens_decoder", "eos_token", "special_tokens_map.json"])
def test_an_unknown_field_of_a_token_object_is_refused_not_printed(tmp_path, capfd, where):
    """tokenizers' AddedToken prints "Ignored unknown kwarg option KEY" to stdout itself (Rust,
    past Python) for a key it does not take, as transformers builds the token: the file's text
    reached the terminal raw, escape sequences and all, and broke `--json` output (found by
    tests/test_fuzz_checkpoint.py)."""
    slow = _write_qwen2_style(tmp_path / "slow", with_tokenizer_json=False)
    name = _with_junk_key(slow, where)
    with pytest.raises(CheckpointError) as err:
        load_tokenizer(slow)
    text = str(err.value)
    assert name in text and "unknown field" in text and "\\x1b[2Jx" in text and "\n" not in text and "\x1b" not in text, text
    out, _ = capfd.readouterr()
    assert out == "", out


@pytest.mark.parametrize("value", ["false", 0, None])
@pytest.mark.parametrize("layout", ["tokenizer.json", "fallback"])
def test_a_token_flag_that_is_not_true_or_false_is_refused(tmp_path, qwen2_style, layout, value):
    """An added token's "lstrip": "false" was true to Python: the token swallowed the space before
    it, and "special": "false" made it special (never printed). transformers refuses such a file in
    pyo3's words ("'str' object is not an instance of 'bool'"); both layouts now name the field."""
    if layout == "fallback":
        folder = _write_qwen2_style(tmp_path / "slow", with_tokenizer_json=False)
    else:
        folder = tmp_path / "fast"
        folder.mkdir()
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (folder / name).write_bytes((qwen2_style / name).read_bytes())
    config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    key = max(config["added_tokens_decoder"], key=int)
    config["added_tokens_decoder"][str(int(key) + 1)] = {"content": "<new>", "lstrip": value}
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    with pytest.raises(CheckpointError) as err:
        load_tokenizer(folder)
    text = str(err.value)
    assert "tokenizer_config.json is not usable: added_tokens_decoder entry" in text, text
    assert f"has lstrip {json.dumps(value)}, not true or false" in text and "\n" not in text, text


@pytest.mark.parametrize("name, words", [("vocab.json", "vocabulary entries"), ("merges.txt", "merges")])
def test_the_fallback_refuses_files_far_larger_than_the_vocabulary_unread(tmp_path, monkeypatch, name, words):
    """As tokenizer.json: transformers parsed a vocab.json of millions of entries whole (gigabytes)
    before anything compared them with config.json's vocab_size. Counted first, from the bytes."""
    import transformers

    slow = _write_qwen2_style(tmp_path / "slow", with_tokenizer_json=False)
    if name == "vocab.json":
        vocab = json.loads((slow / name).read_text(encoding="utf-8"))
        vocab.update((f"x{i:x}", len(vocab) + i) for i in range(70_000))
        (slow / name).write_text(json.dumps(vocab), encoding="utf-8")
    else:
        lines = (slow / name).read_text(encoding="utf-8").splitlines()[1:]
        (slow / name).write_text("#version: 0.2\n" + "\n".join(lines * (70_000 // len(lines) + 1)) + "\n", encoding="utf-8")
    monkeypatch.setattr(transformers, "AutoTokenizer", None)  # not reached
    with pytest.raises(CheckpointError) as err:
        load_tokenizer(slow, vocab_size=500)
    text = str(err.value)
    assert f"{slow / name} holds up to" in text and words in text and "vocab_size of 500" in text, text


def test_startup_imports_neither_transformers_nor_torch_compilers():
    """Loading the demo model as the REPL does imports no transformers, sympy or torch._dynamo
    (each costs seconds before the first prompt), nor the Markdown renderer (needed at the first answer)."""
    code = (
        "import sys\n"
        "from internvl_chat.settings import Settings\n"
        "from internvl_chat.ui.setup import open_session\n"
        "import internvl_chat.ui.repl\n"
        "s = open_session(Settings(), show_progress=False)\n"
        "assert s.builder.first_turn('hi')\n"
        "late = ('transformers', 'sympy', 'torch._dynamo', 'rich.markdown', 'pygments')\n"
        "print(sorted(m for m in late if m in sys.modules))\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO,
                         env={"PATH": "/usr/bin:/bin", "INTERNVL_CHAT_CONFIG": "/dev/null", "HOME": "/nonexistent"})  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"


# --- the tiny tokenizer's files (moved from test_checkpoint.py) --------------------------------


def test_tokenizer_special_tokens(tiny_original):
    tok = load_tokenizer(tiny_original)
    ids = tokenizer_json_ids(tiny_original)
    special = special_token_ids(tok)
    assert special.im_start == ids["<|im_start|>"] and special.im_end == ids["<|im_end|>"]
    assert special.endoftext == ids["<|endoftext|>"] and special.img_context == ids["<IMG_CONTEXT>"]
    assert special.img_start == ids["<img>"] and special.img_end == ids["</img>"]
    for text in ("<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>"):
        assert ids[text] in tok.special_ids
    # nothing is prepended, and typed special-token text is not a special token
    typed = tok.encode("<|im_start|>user")
    assert special.im_start not in typed and tok.decode(typed) == "<|im_start|>user"


def test_tokenizer_round_trips_utf8_and_splits_multibyte(tiny_tokenizer):
    tok = load_tokenizer(tiny_tokenizer)
    text = "Hello 世界! e\u0301 ümlaut 🤖\n\t<img></img> 龘"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    pieces = [tok.decode([i]) for i in tok.encode("龘")]
    assert len(pieces) > 1 and "\ufffd" in "".join(pieces)  # one character, several byte tokens


def test_tokenizer_chat_template(tiny_tokenizer):
    tok = AutoTokenizer.from_pretrained(str(tiny_tokenizer))  # a property of the files the tiny tokenizer ships
    text = tok.apply_chat_template(
        [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}], tokenize=False, add_generation_prompt=True
    )
    assert text == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n"


# --- broken folders ----------------------------------------------------------------------------


def test_tokenizer_missing_or_incomplete(tmp_path, tiny_tokenizer):
    with pytest.raises(CheckpointError, match="no tokenizer"):
        load_tokenizer(tmp_path)

    class Fake:
        def get_vocab(self):
            return {"<|im_start|>": 1, "<|im_end|>": 2, "<|endoftext|>": 3, "<img>": 4, "</img>": 5}

    with pytest.raises(CheckpointError, match="IMG_CONTEXT"):
        special_token_ids(Fake())


@pytest.mark.parametrize(
    "files, message",
    [
        ({"tokenizer.json": "{not json"}, "cannot read .*tokenizer.json"),
        ({"tokenizer.json": "[]"}, "cannot read .*tokenizer.json"),
        ({"tokenizer_config.json": "{"}, "tokenizer_config.json is not usable: it is not valid JSON"),
        ({"tokenizer_config.json": "[1]"}, "not a JSON object"),
        ({"tokenizer_config.json": '{"added_tokens_decoder": {"x": 1}}'}, "entry 'x' is malformed"),
        ({"tokenizer_config.json": '{"added_tokens_decoder": {"3": {"content": "<|im_end|>", "special": true}}}'},
         "gives '<|im_end|>' the id 3"),
        # what json.loads refuses without a JSONDecodeError, and ids int() cannot read
        ({"tokenizer_config.json": "[" * 100_000 + "]" * 100_000}, "tokenizer_config.json is not usable: it is nested too deeply"),
        ({"tokenizer_config.json": '{"model_max_length": ' + "1" * 5000 + "}"}, "tokenizer_config.json is not usable: a number"),
        ({"tokenizer_config.json": '{"added_tokens_decoder": {"\u00b2": {"content": "<x>"}}}'}, "entry '²' is malformed"),
        ({"tokenizer_config.json": '{"added_tokens_decoder": {"' + "9" * 5000 + '": {"content": "<x>"}}}'}, "is malformed"),
        # a "\\ud800" escape is a lone surrogate, which the tokenizer cannot take (a UnicodeEncodeError)
        ({"tokenizer_config.json": '{"added_tokens_decoder": {"5": {"content": "\\udc80x", "special": true}}}'}, "entry '5' is malformed"),
    ],
)  # fmt: skip
def test_broken_tokenizer_files_are_one_clear_error(tmp_path, tiny_tokenizer, files, message):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((tiny_tokenizer / name).read_bytes())
    for name, text in files.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    with pytest.raises(CheckpointError, match=message):
        load_tokenizer(tmp_path)


def test_the_parsers_reason_and_the_folder_are_shown_inert(tmp_path, tiny_tokenizer):
    # found by fuzzing: the Rust parser quotes a bad value, and an escape sequence in it (here one
    # that sets the terminal's title) reached the terminal as it was
    folder = tmp_path / "model\x1b[2J"
    folder.mkdir()
    (folder / "tokenizer_config.json").write_bytes((tiny_tokenizer / "tokenizer_config.json").read_bytes())
    data = json.loads((tiny_tokenizer / "tokenizer.json").read_text(encoding="utf-8"))
    (folder / "tokenizer.json").write_text(json.dumps({**data, "version": "1.0\x1b]0;t\x07"}), encoding="utf-8")
    with pytest.raises(CheckpointError, match="Unknown tokenizer version") as err:
        load_tokenizer(folder)
    assert "\x1b" not in str(err.value) and "\x07" not in str(err.value)
    assert "model\\e[2J" in str(err.value) and "1.0\\e]0;t\\x07" in str(err.value)


def test_a_tokenizer_json_the_parser_panics_on_is_one_clear_error(tmp_path, tiny_tokenizer):
    # found by fuzzing: tokenizers panics building this BPE; pyo3 raises that as a PanicException,
    # a BaseException that went past `except Exception` and ended the app with a traceback
    (tmp_path / "tokenizer_config.json").write_bytes((tiny_tokenizer / "tokenizer_config.json").read_bytes())
    data = json.loads((tiny_tokenizer / "tokenizer.json").read_text(encoding="utf-8"))
    data["model"]["continuing_subword_prefix"] = "##"
    (tmp_path / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(CheckpointError, match=r"^cannot read .*tokenizer\.json: .*; the tokenizer files may be incomplete$"):
        load_tokenizer(tmp_path)


def _without_added_token(entries: list, content: str) -> list:
    return [e for e in entries if e["content"] != content]


def _with_id(entries: list, content: str, token_id: int) -> list:
    return [{**e, "id": token_id} if e["content"] == content else e for e in entries]


ADDED_TOKEN_LIES = {
    # the backend numbers added tokens in list order: each lie moved <img> and the tokens after it
    "one removed": lambda entries: _without_added_token(entries, "<|im_end|>"),
    "an id repeated": lambda entries: _with_id(entries, "<img>", 541),
    "an id past the others": lambda entries: _with_id(entries, "<IMG_CONTEXT>", 10**6),
    "two swapped": lambda entries: _with_id(_with_id(entries, "<img>", 543), "</img>", 542),
}


@pytest.mark.parametrize("case", list(ADDED_TOKEN_LIES))
def test_added_tokens_not_at_the_ids_tokenizer_json_gives_are_refused(tmp_path, tiny_tokenizer, case):
    """Without tokenizer_config.json's added_tokens_decoder to compare with, a damaged added_tokens
    list in tokenizer.json loaded: <img>, </img> and <IMG_CONTEXT> took other ids than the file
    gives them (the embedding rows the model was trained with), and prompts were silently wrong."""
    data = json.loads((tiny_tokenizer / "tokenizer.json").read_text(encoding="utf-8"))
    assert [e["content"] for e in data["added_tokens"]][:6] == [
        "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>"]  # fmt: skip
    data["added_tokens"] = ADDED_TOKEN_LIES[case](data["added_tokens"])
    (tmp_path / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(CheckpointError) as err:
        load_tokenizer(tmp_path)
    text = str(err.value)
    assert "\n" not in text and str(tmp_path / "tokenizer.json") in text and "the file is damaged" in text, text


def test_added_token_ids_are_read_from_the_top_level_list(tmp_path, tiny_tokenizer):
    """A quoted "added_tokens": [...] inside a string (here a vocabulary entry) is not the list."""
    data = json.loads((tiny_tokenizer / "tokenizer.json").read_text(encoding="utf-8"))
    decoy = '"added_tokens": [{"id": 7, "content": "<img>"}]'
    data["model"]["vocab"][decoy] = len(data["model"]["vocab"])
    data["added_tokens"] = [{**e, "id": e["id"] + 1} for e in data["added_tokens"]]  # after the new entry
    data = {"model": data.pop("model"), **data}  # the vocabulary first: its decoy comes before the list
    (tmp_path / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    assert load_tokenizer(tmp_path).convert_tokens_to_ids("<img>") == data["added_tokens"][3]["id"]


def _replace(pattern: str, content: str) -> dict:
    return {"type": "Replace", "pattern": {"String": pattern}, "content": content}


def _charsmap(key: str, replacement: str) -> dict:
    """A SentencePiece "Precompiled" normalizer whose charsmap maps the one-byte `key` to
    `replacement`: a darts-clone double array (the root at 0, `key`'s unit at its byte, that unit's
    leaf 1024 further) and the pool of NUL-terminated strings its values point into."""
    byte = key.encode("utf-8")[0]
    units = [0] * 1129
    units[byte] = (1024 << 10) | (1 << 8) | byte  # offset to its leaf, has a leaf, label
    units[byte ^ 1024] = 1 << 31  # the leaf: the string at offset 0 of the pool
    trie = b"".join(struct.pack("<I", unit) for unit in units)
    blob = struct.pack("<I", len(trie)) + trie + replacement.encode("utf-8") + b"\0"
    return {"type": "Precompiled", "precompiled_charsmap": base64.b64encode(blob).decode("ascii")}


TEXT_MULTIPLIERS = {
    # each was a multi-GB allocation on the first prompt (4 MiB for each "h": 2 GB; 30 MiB prepended: over 5 GB)
    "a long replacement": ("normalizer", _replace("h", "x" * 100_000), "a factor of 100,001"),
    "a long prefix": ("normalizer", {"type": "Prepend", "prepend": "x" * 100_000}, "a factor of 100,001"),
    "short doublings in a row": ("normalizer", {"type": "Sequence", "normalizers": [_replace("a", "aa")] * 40}, "more than 128 times longer"),
    # a SentencePiece charsmap's string in place of each "h" (the backend wrote 100,000 x's for it)
    "a long charsmap string": ("normalizer", _charsmap("h", "x" * 100_000), "a factor of 100,000"),
    "short charsmap strings in a row": ("normalizer", {"type": "Sequence", "normalizers": [_charsmap("h", "hé")] * 8}, "a factor of 256"),
    "a long replacement when decoding": ("decoder", {"type": "Sequence", "decoders": [_replace("Ġ", "y" * 5000)]}, "a factor of 5,001"),
}


@pytest.mark.parametrize("case", list(TEXT_MULTIPLIERS))
def test_a_normalizer_or_decoder_that_multiplies_text_is_refused(tmp_path, tiny_tokenizer, case):
    part, component, words = TEXT_MULTIPLIERS[case]
    data = json.loads((tiny_tokenizer / "tokenizer.json").read_text(encoding="utf-8"))
    data[part] = component
    (tmp_path / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(CheckpointError) as err:
        load_tokenizer(tmp_path)
    text = str(err.value)
    assert f"the {part} of {tmp_path / 'tokenizer.json'}" in text and words in text and len(text) < 300, text


def _parsed_with(tiny_tokenizer: Path, **parts: Any) -> Any:
    """The tiny tokenizer.json with `parts` replaced, parsed by the backend (not loaded: a tokenizer
    that changes text is then refused by the round-trip check, after the growth check)."""
    from tokenizers import Tokenizer as Backend

    data = json.loads((tiny_tokenizer / "tokenizer.json").read_text(encoding="utf-8"))
    return Backend.from_str(json.dumps({**data, **parts}))


_STEPS = {"normalizer": ("normalizers", {"type": "NFC"}), "pre_tokenizer": ("pretokenizers", {"type": "Digits", "individual_digits": False}),
          "decoder": ("decoders", {"type": "Fuse"})}  # fmt: skip


@pytest.mark.parametrize("part", _STEPS)
@pytest.mark.parametrize("nested", [False, True])
def test_a_normalizer_pre_tokenizer_or_decoder_of_many_steps_is_refused(tmp_path, qwen2_style, part, nested):
    """Each step runs over all the text: a Sequence of 60,000 NFC steps (1 MB, within the entry
    counts) took 12 s to encode 10,000 characters, and one of Qwen2's size has room for ~300,000.
    Sequences nested in Sequences count through."""
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((qwen2_style / name).read_bytes())
    data = json.loads((tmp_path / "tokenizer.json").read_text(encoding="utf-8"))
    key, step = _STEPS[part]
    steps = [step] * (MAX_PIPELINE_STEPS + 1)
    if nested:
        steps = [{"type": "Sequence", key: steps[:10]}, {"type": "Sequence", key: steps[10:]}]
    data[part] = {"type": "Sequence", key: steps}
    (tmp_path / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(CheckpointError, match=rf"the {part.replace('_', '-')} of .*tokenizer.json has 65 steps, more than a "
                       rf"tokenizer's \({MAX_PIPELINE_STEPS} at most\)"):  # fmt: skip
        load_tokenizer(tmp_path)
    data[part] = {"type": "Sequence", key: [step] * MAX_PIPELINE_STEPS}  # as many as allowed: no step refused
    (tmp_path / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    try:
        load_tokenizer(tmp_path)
    except CheckpointError as e:
        assert "steps" not in str(e), e


@pytest.mark.parametrize("longest", [MAX_WORDPIECE_WORD_CHARS + 1, 10**9])
def test_a_wordpiece_model_that_reads_very_long_words_is_refused(tmp_path, tiny_tokenizer, longest):
    """WordPiece matches a word longest piece first, at a cost growing with the cube of its length:
    this tokenizer (byte-level pieces, no subword prefix: it gives the probe text back) took 10 s on
    a word of 8,000 characters with max_input_chars_per_word of 10^9. A tokenizer's is 100."""
    (tmp_path / "tokenizer_config.json").write_bytes((tiny_tokenizer / "tokenizer_config.json").read_bytes())
    data = json.loads((tiny_tokenizer / "tokenizer.json").read_text(encoding="utf-8"))
    model = {"type": "WordPiece", "unk_token": "!", "continuing_subword_prefix": "", "vocab": data["model"]["vocab"]}
    for words, refused in ((MAX_WORDPIECE_WORD_CHARS, False), (longest, True)):
        data["model"] = {**model, "max_input_chars_per_word": words}
        (tmp_path / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
        if not refused:
            assert load_tokenizer(tmp_path).encode("hello") != []  # loads and encodes at the limit
            continue
        with pytest.raises(CheckpointError, match=rf"WordPiece model of .*tokenizer.json reads words of up to {longest:,} "):
            load_tokenizer(tmp_path)


def test_a_unigram_model_with_very_long_pieces_is_refused(tmp_path, tiny_tokenizer):
    """A Unigram model tries every piece that begins at each character: pieces of one to 2,000 "q"s
    (the byte-level pieces kept, so it gives the probe text back) took 9 s on 20,000 "q"s, and the
    file limit allows pieces far longer. SentencePiece makes pieces of 16 characters by default."""
    (tmp_path / "tokenizer_config.json").write_bytes((tiny_tokenizer / "tokenizer_config.json").read_bytes())
    data = json.loads((tiny_tokenizer / "tokenizer.json").read_text(encoding="utf-8"))
    pieces = [[piece, -1.0] for piece, _ in sorted(data["model"]["vocab"].items(), key=lambda entry: entry[1])]
    for longest, refused in ((MAX_UNIGRAM_PIECE_CHARS, False), (MAX_UNIGRAM_PIECE_CHARS + 1, True)):
        data["model"] = {"type": "Unigram", "unk_id": 0, "vocab": [*pieces, ["q" * longest, -9.0]], "byte_fallback": False}
        data["added_tokens"], data["post_processor"] = [], None  # the ids of added tokens would follow the new piece
        (tmp_path / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
        if not refused:
            assert load_tokenizer(tmp_path).encode("q" * 600) != []  # loads and encodes at the limit
            continue
        with pytest.raises(CheckpointError, match=rf"Unigram model of .*tokenizer.json has a piece of {longest} characters"):
            load_tokenizer(tmp_path)


def test_the_inserts_of_sentencepiece_style_tokenizers_pass_the_growth_check(tmp_path, tiny_tokenizer):
    backend = _parsed_with(
        tiny_tokenizer,
        normalizer={"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "▁"}, _replace(" ", "▁")]},
        decoder={"type": "Sequence", "decoders": [_replace("▁", " "), {"type": "ByteFallback"}, {"type": "Fuse"}]},
    )
    _check_text_growth(tmp_path / "tokenizer.json", backend)  # refuses nothing
    assert backend.normalizer.normalize_str("a b") == "▁a▁b"


def test_an_albert_style_nfkc_charsmap_passes_the_growth_check(tmp_path, tiny_tokenizer):
    """Unicode's NFKC map, as SentencePiece compiles it, has an 18-character string (for U+FDFA),
    behind two one-character Replaces in ALBERT's tokenizer.json (72 by the worst-case product); the
    charsmap does replace "h" as the tests above take it."""
    backend = _parsed_with(tiny_tokenizer, normalizer={
        "type": "Sequence", "normalizers": [_replace("``", '"'), _replace("''", '"'), _charsmap("h", "é" * 18)]})  # fmt: skip
    _check_text_growth(tmp_path / "tokenizer.json", backend)  # refuses nothing
    assert backend.normalizer.normalize_str("ah!") == "a" + "é" * 18 + "!"


@pytest.mark.parametrize("unmarked", [["<IMG_CONTEXT>"], ["<|im_end|>"], ["<|im_start|>", "<img>", "</img>", "<|endoftext|>"]])
def test_chat_and_image_tokens_typed_as_text_stay_text_whatever_tokenizer_json_says(tmp_path, tiny_tokenizer, unmarked):
    """A tokenizer.json that has the control tokens as plain added tokens: typed in a question they
    became the tokens themselves ("<IMG_CONTEXT>" with an image: a traceback on the image-token
    count; "<|im_end|>": the user's turn ended early). <|im_end|> is also tokenizer_config.json's eos_token."""
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((tiny_tokenizer / name).read_bytes())
    data = json.loads((tmp_path / "tokenizer.json").read_text(encoding="utf-8"))
    for entry in data["added_tokens"]:
        if entry["content"] in unmarked:
            entry["special"] = False
    (tmp_path / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    honest, damaged = load_tokenizer(tiny_tokenizer), load_tokenizer(tmp_path)
    typed = "what " + " ".join(unmarked) + " is this?"
    assert damaged.encode(typed) == honest.encode(typed)
    assert damaged.special_ids == honest.special_ids
    assert [damaged.convert_tokens_to_ids(t) for t in unmarked] == [honest.convert_tokens_to_ids(t) for t in unmarked]


def test_chat_and_image_tokens_typed_as_text_stay_text_in_the_fallback_too(tmp_path):
    """The same with vocab.json + merges.txt: transformers 5 matches a plain added token in text
    even with split_special_tokens, so tokenizer_config.json marking them plain let them in."""
    honest = load_tokenizer(_write_qwen2_style(tmp_path / "honest", with_tokenizer_json=False))
    folder = _write_qwen2_style(tmp_path / "plain", with_tokenizer_json=False)
    config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    unmarked = ("<IMG_CONTEXT>", "<|im_end|>")
    for entry in config["added_tokens_decoder"].values():
        if entry["content"] in unmarked:
            entry["special"] = False
    config["additional_special_tokens"] = [t for t in config["additional_special_tokens"] if t not in unmarked]
    config["eos_token"] = None
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    damaged = load_tokenizer(folder)
    assert type(damaged).__name__ == "TransformersTokenizer"
    typed = "what <IMG_CONTEXT> is this <|im_end|>"
    assert damaged.encode(typed) == honest.encode(typed)
    assert [damaged.convert_tokens_to_ids(t) for t in unmarked] == [honest.convert_tokens_to_ids(t) for t in unmarked]


def test_a_named_special_token_that_is_no_text_is_ignored(tmp_path, tiny_tokenizer):
    """tokenizer_config.json's eos_token as a lone surrogate (a JSON "\\ud800" escape) cannot be a
    token: it is skipped like a non-string one, instead of a UnicodeEncodeError traceback."""
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((tiny_tokenizer / name).read_bytes())
    config = json.loads((tmp_path / "tokenizer_config.json").read_text(encoding="utf-8"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "eos_token": "\ud800"}), encoding="utf-8")
    assert load_tokenizer(tmp_path).special_ids == load_tokenizer(tiny_tokenizer).special_ids


def test_a_long_token_in_an_error_is_cut_short(tmp_path, tiny_tokenizer):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((tiny_tokenizer / name).read_bytes())
    entry = {"content": "<" + "x" * 100_000 + ">", "special": True}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": {"0": entry}}), encoding="utf-8")
    with pytest.raises(CheckpointError, match="the id 0") as err:
        load_tokenizer(tmp_path)
    assert len(str(err.value)) < 300


def _watch_backend(monkeypatch, watched: tuple[str, ...], heard) -> None:
    """Each backend loaded from a tokenizer.json is wrapped: a call of a `watched` method is told
    to `heard(name, args)` first."""
    import tokenizers

    real = tokenizers.Tokenizer

    class Watched:
        def __init__(self, backend):
            object.__setattr__(self, "_backend", backend)

        def __getattr__(self, name):
            attr = getattr(self._backend, name)
            if name in watched:
                return lambda *args, **kwargs: heard(name, args) or attr(*args, **kwargs)
            return attr

        def __setattr__(self, name, value):
            setattr(self._backend, name, value)

    class Backend:
        @staticmethod
        def from_str(text):
            return Watched(real.from_str(text))

    monkeypatch.setattr(tokenizers, "Tokenizer", Backend)


@pytest.fixture
def added_per_call(monkeypatch) -> list[int]:
    """The number of tokens each call that adds tokens to the backend adds."""
    calls: list[int] = []
    _watch_backend(monkeypatch, ("add_tokens", "add_special_tokens"), lambda name, args: calls.append(len(args[0])))
    return calls


@pytest.mark.parametrize("where", ["added_tokens_decoder", "additional_special_tokens"])
def test_many_tokens_declared_only_in_tokenizer_config_are_added_at_once(tmp_path, tiny_tokenizer, added_per_call, where):
    """Each token added on its own rebuilt the backend's matcher: a tokenizer_config.json declaring
    8,000 new tokens took a minute to load, 60,000 (a 2 MB file) hours. They are added in one call,
    at the ids declared (or the next ones, for named special tokens), each of its declared kind."""
    (tmp_path / "tokenizer.json").write_bytes((tiny_tokenizer / "tokenizer.json").read_bytes())
    config = json.loads((tiny_tokenizer / "tokenizer_config.json").read_text(encoding="utf-8"))
    first = load_tokenizer(tiny_tokenizer)
    base = len(first)
    added_per_call.clear()
    if where == "added_tokens_decoder":
        declared = {str(base + i): {"content": f"<new{i}>", "special": i % 3 == 0} for i in range(3000)}
        config["added_tokens_decoder"] = {**config.get("added_tokens_decoder", {}), **declared}
    else:
        config["additional_special_tokens"] = [f"<new{i}>" for i in range(3000)]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    tok = load_tokenizer(tmp_path)
    assert added_per_call == [3000]
    assert len(tok) == base + 3000
    for i in (0, 1, 2, 2999):
        assert tok.convert_tokens_to_ids(f"<new{i}>") == base + i
        assert ((base + i) in tok.special_ids) == (i % 3 == 0 or where == "additional_special_tokens")
    assert first.special_ids <= tok.special_ids


_LONG_TOKEN = "x" * (MAX_ADDED_TOKEN_BYTES + 1)


def _with_long_token(folder: Path, where: str) -> str:
    """`folder`'s tokenizer with one token longer than all a tokenizer's together, put `where`;
    the name of the file that holds it."""
    if where.startswith("tokenizer.json"):
        data = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
        entry = {"single_word": False, "lstrip": False, "rstrip": False, "normalized": False, "special": True}
        data["added_tokens"].append({**entry, "id": data["added_tokens"][-1]["id"] + 1, "content": _LONG_TOKEN})
        text = json.dumps(data)
        if where == "tokenizer.json, its key escaped":  # the backend reads "\u0061dded_tokens" as the same key
            text = text.replace('"added_tokens"', '"\\u0061dded_tokens"')
        (folder / "tokenizer.json").write_text(text, encoding="utf-8")
        return "tokenizer.json"
    in_config = ("added_tokens_decoder", "eos_token", "image_token", "extra_special_tokens")
    if where == "special_tokens_map.json, a lone surrogate":  # no text to the backend, but bytes to read
        where, long_token = "special_tokens_map.json", _LONG_TOKEN + "\ud800"
    else:
        long_token = _LONG_TOKEN
    name = "tokenizer_config.json" if where in in_config else where
    data = json.loads((folder / name).read_text(encoding="utf-8")) if (folder / name).exists() else {}
    if where == "added_tokens_decoder":
        data[where] = {**data.get(where, {}), "1000": {"content": long_token, "special": True}}
    elif where == "image_token":  # transformers 5 adds any "*_token" key's token, a model-specific special token
        data[where] = long_token
    elif where == "extra_special_tokens":  # transformers 5 adds them beside additional_special_tokens
        data["additional_special_tokens"] = ["<img>"]
        data[where] = [long_token]
    elif where == "added_tokens.json":
        data[long_token] = 1000
    else:  # eos_token of tokenizer_config.json or special_tokens_map.json
        data["eos_token"] = long_token
    (folder / name).write_text(json.dumps(data), encoding="utf-8")
    return name


@pytest.mark.parametrize("where", ["tokenizer.json", "tokenizer.json, its key escaped", "added_tokens_decoder", "eos_token"])
def test_added_tokens_far_longer_than_a_tokenizers_are_refused_before_the_backend_builds_them(tmp_path, qwen2_style, where):
    """The backend's matcher for added tokens takes ~73 bytes of memory per byte of their text: one
    added token of 20 MB took 1.4 GB, and the 64 MiB file limit allowed ~5 GB (16 MiB of
    tokenizer_config.json ~1.2 GB). A tokenizer's added tokens take a few hundred bytes."""
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((qwen2_style / name).read_bytes())
    name = _with_long_token(tmp_path, where)
    with pytest.raises(CheckpointError) as err:
        load_tokenizer(tmp_path)
    message = str(err.value)
    assert re.search(rf"/{re.escape(name)} declares added or special tokens of 2,09\d,\d\d\d bytes in all", message)
    assert "xxxx" not in message and "\n" not in message


@pytest.mark.parametrize(
    "where",
    ["added_tokens_decoder", "image_token", "extra_special_tokens", "special_tokens_map.json",
     "special_tokens_map.json, a lone surrogate", "added_tokens.json"],
)
def test_the_fallback_refuses_added_tokens_far_longer_than_a_tokenizers(tmp_path, where):
    """The same bound where transformers builds the tokenizer from vocab.json and merges.txt: it adds
    the tokens of tokenizer_config.json, special_tokens_map.json and added_tokens.json alike, those
    of tokenizer_config.json from any "*_token" key and from extra_special_tokens beside
    additional_special_tokens too (a 3 MiB token there was added, past the bound)."""
    slow = _write_qwen2_style(tmp_path / "slow", with_tokenizer_json=False)
    name = _with_long_token(slow, where)
    with pytest.raises(CheckpointError, match=rf"/{re.escape(name)} declares added or special tokens of 2,09\d,\d\d\d bytes"):
        load_tokenizer(slow)


def test_a_long_value_quoted_by_the_tokenizer_json_parser_is_cut_short(tmp_path, tiny_tokenizer):
    """The Rust parser quotes a value of the wrong type whole: a 100,000-character string where an
    id belongs made a 100,000-character error line."""
    (tmp_path / "tokenizer_config.json").write_bytes((tiny_tokenizer / "tokenizer_config.json").read_bytes())
    data = json.loads((tiny_tokenizer / "tokenizer.json").read_text(encoding="utf-8"))
    data["added_tokens"][0]["id"] = "y" * 100_000
    (tmp_path / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(CheckpointError, match="tokenizer.json: invalid type") as err:
        load_tokenizer(tmp_path)
    assert "yyyy" in str(err.value) and len(str(err.value)) < 300 and "\n" not in str(err.value)


def test_bpe_dropout_saved_in_tokenizer_json_does_not_make_encoding_random(tmp_path, tiny_tokenizer):
    """A BPE `dropout` in tokenizer.json (a training setting) left every encode of a text random:
    the model read other ids than it would each time, and cached prompts stopped matching."""
    (tmp_path / "tokenizer_config.json").write_bytes((tiny_tokenizer / "tokenizer_config.json").read_bytes())
    data = json.loads((tiny_tokenizer / "tokenizer.json").read_text(encoding="utf-8"))
    data["model"]["dropout"] = 0.9
    (tmp_path / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    text = "The quick brown fox jumps over the lazy dog, naïve café."
    want = load_tokenizer(tiny_tokenizer).encode(text)
    tokenizer = load_tokenizer(tmp_path)
    assert all(tokenizer.encode(text) == want for _ in range(20))


def test_a_regex_the_backend_cannot_run_is_one_error_and_the_conversation_goes_on(tiny_original, tmp_path):
    """tokenizer.json may hold a pre-tokenizer regex that backtracks without end: the Rust backend
    panics, and pyo3's PanicException (a BaseException) ended the app with a traceback."""
    from internvl_chat.chat.sampling import SamplingParams
    from internvl_chat.chat.session import Session
    from internvl_chat.engine.loader import load_model

    folder = tmp_path / "redos"
    shutil.copytree(tiny_original, folder)
    spec = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    spec["pre_tokenizer"] = redos_pre_tokenizer(spec["pre_tokenizer"])
    (folder / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    session = Session(load_model(folder, device="cpu", dtype="float32", max_context=256), SamplingParams(max_new_tokens=2))
    list(session.ask("Hi."))
    state = (list(session.ids), session.start_pos, len(session.turns))
    with pytest.raises(CheckpointError, match="tokenizer.json failed on this text.*re-download the tokenizer files") as err:
        list(session.ask("a" * 40 + "!"))
    assert "\n" not in str(err.value)
    assert (session.ids, session.start_pos, len(session.turns)) == state
    list(session.ask("Still there?"))
    assert len(session.turns) == 2


def test_a_regex_the_backend_cannot_run_on_the_start_probe_is_named_as_such(tmp_path, tiny_tokenizer):
    """The round-trip probe encodes text at every start: a pre-tokenizer regex that backtracks past the
    backend's limit on it refused the start with the message for text typed in a conversation ("failed
    on this text"), where none was typed, and without the file's path."""
    (tmp_path / "tokenizer_config.json").write_bytes((tiny_tokenizer / "tokenizer_config.json").read_bytes())
    data = json.loads((tiny_tokenizer / "tokenizer.json").read_text(encoding="utf-8"))
    backtracks = {"type": "Split", "pattern": {"Regex": r"^(\S+\s?)*$"}, "behavior": "Isolated", "invert": False}
    data["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [backtracks, data["pre_tokenizer"]]}
    (tmp_path / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(CheckpointError) as err:
        load_tokenizer(tmp_path)
    message = str(err.value)
    assert message.startswith(f"{tmp_path / 'tokenizer.json'} fails on ordinary text (") and "retry-limit" in message
    assert "this text" not in message and "\n" not in message and message.endswith("re-download the tokenizer files")


@pytest.mark.parametrize("merges_as", ["pairs", "strings"])
def test_a_tokenizer_of_qwen2s_size_is_within_the_entry_bound(tmp_path, merges_as):
    """The bound on tokenizer.json's entries (checked before parsing) leaves room for InternVL3's own:
    Qwen2's 151,643 BPE entries and 151,387 merges (saved as ["a", "b"] pairs by recent tokenizers,
    as "a b" strings before) and 29 added tokens, for a vocab_size of 151,674. One token in 8 here
    holds a ':' and a ',' (which the counts take for structure), far more than Qwen2's."""
    from internvl_chat.engine.tokenizer import _check_entry_count

    tokens = [f"Ġ{i:x}" + (":," if i % 8 == 0 else "") for i in range(151_643)]
    merges = [[tokens[i // 2], tokens[i]] for i in range(256, 151_643)]
    added = [{"id": 151_643 + i, "content": f"<|extra_{i}|>", "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for i in range(29)]  # fmt: skip
    data = {"added_tokens": added, "model": {"type": "BPE", "vocab": dict(zip(tokens, range(len(tokens)))),
            "merges": merges if merges_as == "pairs" else [" ".join(pair) for pair in merges]}}  # fmt: skip
    _check_entry_count(tmp_path / "tokenizer.json", json.dumps(data, indent=2), 151_674)
    with pytest.raises(CheckpointError, match="holds up to"):  # while five times the merges are not
        data["model"]["merges"] *= 5
        _check_entry_count(tmp_path / "tokenizer.json", json.dumps(data, indent=2), 151_674)


def test_a_start_builds_the_vocabulary_once(tiny_original, monkeypatch):
    """Building the vocabulary takes ~0.14 s on Qwen2's: a start built it three times (the special
    ids, the loader's id checks, fewest_tokens' longest entry). Once, until a token is added."""
    from internvl_chat.engine.loader import load_model

    builds: list[str] = []
    _watch_backend(monkeypatch, ("get_vocab",), lambda name, args: builds.append(name))
    tokenizer = load_model(tiny_original, device="cpu", dtype="float32", max_context=64).tokenizer
    assert tokenizer.fewest_tokens("a question" * 100) > 0
    assert builds == ["get_vocab"]
    tokenizer.backend.add_tokens(["<new>"])
    assert tokenizer.get_vocab()["<new>"] == len(tokenizer) - 1 and len(builds) == 2


def test_a_tokenizer_with_its_vocabulary_built_still_pickles(tiny_tokenizer):
    """The vocabulary it keeps is a plain dict (a read-only view of it is handed out)."""
    import pickle

    tokenizer = load_tokenizer(tiny_tokenizer)
    vocab = tokenizer.get_vocab()
    with pytest.raises(TypeError):
        vocab["<new>"] = len(vocab)  # type: ignore[index]
    assert pickle.loads(pickle.dumps(tokenizer)).get_vocab() == vocab


@pytest.mark.parametrize("shape", ["one long", "many short", "key escaped", "a String pattern"])
def test_regular_expressions_far_longer_than_a_tokenizers_are_refused_before_parsing(tmp_path, tiny_tokenizer, monkeypatch,
                                                                                      shape):  # fmt: skip
    """The parser compiles tokenizer.json's patterns, at a cost the entry counts do not see: an
    alternation of 4 million words (30 MiB, two ':' and no ',' of its own) took 4.5 s and 1.2 GB.
    Over 65,536 characters in all is refused unparsed: one pattern or a Sequence of many, under a
    key written with an escape ("\\u0052egex" is "Regex" to the parser), or a String pattern (a
    literal, compiled as a regular expression too)."""
    from tokenizers import Tokenizer as Backend

    (tmp_path / "tokenizer_config.json").write_bytes((tiny_tokenizer / "tokenizer_config.json").read_bytes())
    data = json.loads((tiny_tokenizer / "tokenizer.json").read_text(encoding="utf-8"))
    words = [f"w{i:x}" for i in range(15_000)]  # ~90,000 characters

    def split(pattern: str, kind: str = "Regex") -> dict:
        return {"type": "Split", "pattern": {kind: pattern}, "behavior": "Isolated", "invert": False}

    if shape == "many short":
        splits = [split("|".join(words[i : i + 100])) for i in range(0, 15_000, 100)]
    else:
        splits = [split("|".join(words), "String" if shape == "a String pattern" else "Regex")]
    data["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [*splits, data["pre_tokenizer"]]}
    text = json.dumps(data)
    if shape == "key escaped":
        text = text.replace('"Regex"', '"\\u0052egex"')
        assert json.loads(text)["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"].startswith("w0|w1|")
    (tmp_path / "tokenizer.json").write_text(text, encoding="utf-8")
    parsed: list[int] = []
    monkeypatch.setattr(Backend, "from_str", lambda text: parsed.append(len(text)))
    with pytest.raises(CheckpointError, match="holds regular expressions of over 65,536 characters") as err:
        load_tokenizer(tmp_path)
    assert "\n" not in str(err.value) and "use the one shipped with the checkpoint" in str(err.value)
    assert parsed == []


def test_a_tokenizers_own_regular_expressions_pass_the_length_check(tmp_path, tiny_tokenizer):
    """Qwen2's split, as escaped in tokenizer.json, several times over (a Sequence of Splits and a
    Replace normalizer), is far within the limit; a "Regex" key in a token is no pattern."""
    from qwen_like_tokenizer import QWEN_SPLIT

    from internvl_chat.engine.tokenizer import MAX_PATTERN_CHARS, _check_pattern_size

    (tmp_path / "tokenizer_config.json").write_bytes((tiny_tokenizer / "tokenizer_config.json").read_bytes())
    data = json.loads((tiny_tokenizer / "tokenizer.json").read_text(encoding="utf-8"))
    split = {"type": "Split", "pattern": {"Regex": QWEN_SPLIT}, "behavior": "Isolated", "invert": False}
    data["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [split] * 20 + [data["pre_tokenizer"]]}
    # no-break spaces to one space: text that has none (the round-trip check's) comes back as it was
    data["normalizer"] = {"type": "Replace", "pattern": {"Regex": "\u00a0+"}, "content": " "}
    assert 20 * len(json.dumps(QWEN_SPLIT)) < MAX_PATTERN_CHARS and "\u00a0" not in ROUND_TRIP_PROBE
    (tmp_path / "tokenizer.json").write_text(json.dumps(data, indent=2), encoding="utf-8")
    tokenizer = load_tokenizer(tmp_path)
    assert tokenizer.encode("a\u00a0\u00a0b") == tokenizer.encode("a b")
    token = '"Regex": "' + "x" * 2 * MAX_PATTERN_CHARS + '"'
    _check_pattern_size(tmp_path / "tokenizer.json", json.dumps({"model": {"vocab": {token: 5}}}, indent=2))


# --- text must come back as it was; no ordinary word made special ---------------------------------


def _copy_with(folder: Path, to: Path, tokenizer_json: dict | None = None, config: dict | None = None) -> Path:
    """A copy of a tokenizer folder, tokenizer.json's and tokenizer_config.json's fields updated."""
    shutil.copytree(folder, to)
    for name, fields in (("tokenizer.json", tokenizer_json), ("tokenizer_config.json", config)):
        if fields:
            data = json.loads((to / name).read_text(encoding="utf-8"))
            (to / name).write_text(json.dumps({**data, **fields}), encoding="utf-8")
    return to


def test_the_probe_text_is_in_nfc_and_real_layouts_give_it_back(tmp_path, folder):
    """Qwen2's tokenizer.json (InternVL3's) normalises to NFC: a probe that NFC changed would refuse it."""
    import unicodedata

    assert unicodedata.normalize("NFC", ROUND_TRIP_PROBE) == ROUND_TRIP_PROBE
    slow = load_tokenizer(_write_qwen2_style(tmp_path / "slow", with_tokenizer_json=False))
    for tokenizer in (load_tokenizer(folder), slow):
        assert tokenizer.decode(tokenizer.encode(ROUND_TRIP_PROBE)) == ROUND_TRIP_PROBE


_BYTE_LEVEL_DECODER = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}
_STRIP_FIRST_SPACE = {"type": "Strip", "content": " ", "start": 1, "stop": 0}
# hand edits of tokenizer.json that garble text: (the field, its new value, what the error shows)
TEXT_CHANGERS = {
    "a decoder that drops spaces": (
        "decoder", {"type": "Sequence", "decoders": [_BYTE_LEVEL_DECODER, _replace(" ", "")]},
        "' Hello, Worl' gave 'Hello,World!'"),
    "a decoder that strips the first space": (
        "decoder", {"type": "Sequence", "decoders": [_BYTE_LEVEL_DECODER, _STRIP_FIRST_SPACE]},
        "' Hello, Worl' gave 'Hello, World'"),
    "a lowercasing normalizer": ("normalizer", {"type": "Lowercase"}, "' Hello, World' gave ' hello, world'"),
    "an NFKC normalizer": (
        "normalizer", {"type": "Sequence", "normalizers": [{"type": "NFC"}, {"type": "NFKC"}]},
        "'tag>;  x² ﬁne…\\n\\tcafé' gave 'tag>;  x2 fine...\\n\\tc'"),
    "a pre-tokenizer that drops spaces": ("pre_tokenizer", {"type": "Whitespace"}, "' Hello, Worl' gave 'Hello,World!'"),
    "a normalizer that removes typed chat tokens": (
        "normalizer", _replace("<|im_end|>", ""), "'/img>?<|im_end|><|en' gave '/img>?<|endoftext|> '"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(TEXT_CHANGERS))
def test_a_tokenizer_json_that_does_not_give_text_back_is_refused(tmp_path, qwen2_style, case):
    """A hand-edited normalizer, pre-tokenizer or decoder garbled every prompt and answer without a word."""
    field, value, shown = TEXT_CHANGERS[case]
    folder = _copy_with(qwen2_style, tmp_path / "edited", tokenizer_json={field: value})
    with pytest.raises(CheckpointError) as err:
        load_tokenizer(folder)
    text = str(err.value)
    assert text.startswith(f"{folder / 'tokenizer.json'} does not give text back as it was"), text
    assert shown in text and text.endswith("use the tokenizer files published with the model") and "\n" not in text


def test_the_text_a_tokenizer_gives_back_is_shown_escaped(tmp_path, qwen2_style):
    decoder = {"type": "Sequence", "decoders": [_BYTE_LEVEL_DECODER, _replace(",", "\x1b[2J\u202e")]}
    with pytest.raises(CheckpointError, match="does not give text back") as err:
        load_tokenizer(_copy_with(qwen2_style, tmp_path / "edited", tokenizer_json={"decoder": decoder}))
    assert "\x1b" not in str(err.value) and "\u202e" not in str(err.value)
    assert "gave ' Hello\\x1b[2J\\u202e World!'" in str(err.value), str(err.value)


@pytest.mark.parametrize("layout", ["tokenizer.json", "vocab.json"])
def test_an_added_token_that_swallows_the_space_before_it_is_refused(tmp_path, layout):
    """tokenizer_config.json adding "World" with lstrip: " World" lost its space in every text."""
    folder = _write_qwen2_style(tmp_path / "q", with_tokenizer_json=layout == "tokenizer.json")
    config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    next_id = str(max(map(int, config["added_tokens_decoder"])) + 1)
    config["added_tokens_decoder"][next_id] = {"content": "World", "lstrip": True, "normalized": False, "rstrip": False,
                                               "single_word": False, "special": False}  # fmt: skip
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    source = folder / "tokenizer.json" if layout == "tokenizer.json" else f"the tokenizer in {folder}"
    with pytest.raises(CheckpointError, match=f"^{re.escape(str(source))} does not give text back as it was"):
        load_tokenizer(folder)


def _plain_word(folder: Path) -> str:
    """A word of the BPE's own vocabulary: " the", byte-level spelled."""
    vocab = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))["model"]["vocab"]
    assert "Ġthe" in vocab
    return "Ġthe"


@pytest.mark.parametrize("field", ["eos_token", "pad_token", "additional_special_tokens", "added_tokens_decoder",
                                   "extra_special_tokens"])  # fmt: skip
def test_an_ordinary_word_made_a_special_token_is_refused(tmp_path, qwen2_style, field):
    """A special token is never printed: an eos_token that is a word of the vocabulary made that word
    vanish from every answer. extra_special_tokens beside additional_special_tokens went unread
    (transformers 5 makes both keys' tokens special)."""
    word = _plain_word(qwen2_style)
    config = json.loads((qwen2_style / "tokenizer_config.json").read_text(encoding="utf-8"))
    if field == "additional_special_tokens":
        config[field] = [*config[field], word]
    elif field == "extra_special_tokens":
        assert config["additional_special_tokens"]  # both keys given
        config[field] = [word]
    elif field == "added_tokens_decoder":
        word_id = json.loads((qwen2_style / "tokenizer.json").read_text(encoding="utf-8"))["model"]["vocab"][word]
        config[field][str(word_id)] = {"content": word, "lstrip": False, "normalized": False, "rstrip": False,
                                       "single_word": False, "special": True}  # fmt: skip
    else:
        config[field] = word
    for layout in ("tokenizer.json", "vocab.json"):
        folder = _write_qwen2_style(tmp_path / layout, with_tokenizer_json=layout == "tokenizer.json")
        (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
        with pytest.raises(CheckpointError) as err:
            load_tokenizer(folder)
        assert str(err.value) == (
            f"{folder / 'tokenizer_config.json'} makes the ordinary word 'Ġthe' a special token ({field}), which would "
            "drop it from every answer; the file was edited or is not this model's (use the tokenizer files published "
            "with the model)"
        )


@pytest.mark.parametrize("eos", ["<|im_end|>", "<|endoftext|>"])
def test_internvl3s_own_stop_tokens_load(tmp_path, qwen2_style, eos):
    """InternVL3's configs name <|im_end|> or <|endoftext|> (added tokens of tokenizer.json) as eos_token."""
    tokenizer = load_tokenizer(_copy_with(qwen2_style, tmp_path / "eos", config={"eos_token": eos}))
    assert tokenizer.convert_tokens_to_ids(eos) in tokenizer.special_ids


def test_a_chat_token_named_special_is_no_ordinary_word_wherever_the_vocabulary_has_it(tmp_path):
    """The chat and image tokens are special whatever the files say (a tokenizer.json may hold them
    as plain vocabulary entries): naming one eos_token is no word dropped from answers."""
    from internvl_chat.engine.tokenizer import _refuse_words_made_special

    _refuse_words_made_special(tmp_path, {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}, lambda token: True)
    with pytest.raises(CheckpointError, match="makes the ordinary word 'Ġthe' a special token \\(eos_token\\)"):
        _refuse_words_made_special(tmp_path, {"eos_token": "Ġthe"}, lambda token: True)
