"""Checkpoint files are untrusted: every lie in config.json, an index, a safetensors header or a
pickle is one CheckpointError line (exit 2) naming the user's path, before anything is allocated.

Each case below is crafted by hand; the expected words are what a user needs to see (the file,
the key or the problem), never a library's internals or advice.
"""

from __future__ import annotations

import collections
import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from internvl_chat.engine.checkpoint import iter_tensors
from internvl_chat.engine.config import load_config, parse_config
from internvl_chat.engine.loader import load_model
from internvl_chat.engine.weight_files import find_weight_files
from internvl_chat.errors import CheckpointError

REPO = Path(__file__).resolve().parent.parent


def one_line(err: pytest.ExceptionInfo, *words: str) -> str:
    text = str(err.value)
    assert text and "\n" not in text and "\x1b" not in text, text
    assert "Traceback" not in text
    for word in words:
        assert word in text, (word, text)
    return text


def config_of(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text(encoding="utf-8"))


def edited(raw: dict, dotted: str, value) -> dict:
    raw = json.loads(json.dumps(raw))
    *parents, leaf = dotted.split(".")
    node = raw
    for key in parents:
        node = node[key]
    if value is DELETE:
        node.pop(leaf)
    else:
        node[leaf] = value
    return raw


class _Delete:
    """The key is removed (a stable repr: test ids must be the same in every process)."""

    def __repr__(self) -> str:
        return "<deleted>"


DELETE = _Delete()


# ------------------------------------------------------------------ config.json fields

ORIGINAL_LIES = [
    # wrong JSON types: strings for numbers, bools for ints, floats for ints, lists, objects
    ("llm_config.hidden_size", "64"), ("llm_config.hidden_size", True), ("llm_config.hidden_size", 64.0),
    ("llm_config.hidden_size", [64]), ("llm_config.vocab_size", "1024"), ("llm_config.vocab_size", False),
    ("llm_config.num_hidden_layers", {"n": 2}), ("llm_config.rms_norm_eps", "1e-6"), ("llm_config.rope_theta", "1e6"),
    ("llm_config.tie_word_embeddings", "false"), ("llm_config.architectures", "Qwen2ForCausalLM"),
    ("vision_config.qkv_bias", "true"), ("vision_config.norm_type", 3), ("vision_config.layer_norm_eps", "1e-6"),
    ("downsample_ratio", "0.5"), ("select_layer", "-1"), ("template", 5), ("system_message", ["hi"]),
    ("force_image_size", "448"), ("use_thumbnail", 1), ("max_dynamic_patch", 12.5),
    # a JSON "\\ud800" escape is a lone surrogate, which no tokenizer or terminal takes
    ("system_message", "\ud800 be brief"), ("template", "\udc80"),
    # zero, negative, absurd sizes
    ("llm_config.hidden_size", 0), ("llm_config.hidden_size", -64), ("llm_config.hidden_size", 10**7),
    ("llm_config.vocab_size", 0), ("llm_config.vocab_size", 10**9), ("llm_config.num_hidden_layers", 0),
    ("llm_config.num_hidden_layers", 10**6), ("llm_config.intermediate_size", -1), ("llm_config.intermediate_size", 10**8),
    ("llm_config.max_position_embeddings", 0), ("llm_config.max_position_embeddings", 2**40),
    # fewer positions than the smallest --max-context: every turn was refused with advice to raise
    # --max-context, which was refused in turn (above the model's positions, or below 16)
    ("llm_config.max_position_embeddings", 8),
    ("llm_config.num_attention_heads", 0), ("llm_config.num_key_value_heads", 0), ("llm_config.rms_norm_eps", 0),
    ("llm_config.rms_norm_eps", float("nan")), ("llm_config.rope_theta", -1.0), ("llm_config.rope_theta", float("inf")),
    ("vision_config.hidden_size", 0), ("vision_config.num_hidden_layers", -2), ("vision_config.intermediate_size", 0),
    ("vision_config.layer_norm_eps", -1e-6), ("vision_config.patch_size", 0), ("force_image_size", 10**6),
    ("max_dynamic_patch", 0), ("max_dynamic_patch", 10**6), ("min_dynamic_patch", 0),
    # shapes that do not divide
    ("llm_config.num_attention_heads", 3), ("llm_config.num_key_value_heads", 3), ("llm_config.num_key_value_heads", 8),
    ("llm_config.head_dim", 15), ("vision_config.num_attention_heads", 5), ("vision_config.patch_size", 15),
    ("force_image_size", 42), ("force_image_size", 450), ("force_image_size", 14 * 200),
    # missing or not objects
    ("llm_config.hidden_size", DELETE), ("llm_config.vocab_size", None), ("vision_config.num_attention_heads", DELETE),
    ("llm_config", []), ("vision_config", "ViT"), ("llm_config", DELETE),
    # variants the engine does not compute
    ("llm_config.hidden_act", "gelu"), ("llm_config.rope_scaling", {"type": "linear", "factor": 4.0}),
    ("llm_config.rope_scaling", {"rope_type": "yarn", "factor": 4.0}), ("llm_config.use_sliding_window", True),
    ("vision_config.hidden_act", "relu"), ("vision_config.norm_type", "batch_norm"), ("downsample_ratio", 0.25),
    ("ps_version", "v1"), ("select_layer", -2),
    # AWQ settings that cannot fit the widths (hidden 64, FFN 128)
    ("llm_config.quantization_config", {"quant_method": "awq", "bits": 4, "group_size": 48}),
    ("llm_config.quantization_config", {"quant_method": "awq", "bits": 4, "group_size": 96}),
    ("llm_config.quantization_config", {"quant_method": "awq", "bits": "4", "group_size": 32}),
    ("llm_config.quantization_config", "awq"),
]  # fmt: skip


@pytest.mark.parametrize("dotted, value", ORIGINAL_LIES, ids=[f"{d}={v!r}"[:60] for d, v in ORIGINAL_LIES])
def test_original_config_lies_are_one_line(tiny_original, dotted, value):
    raw = edited(config_of(tiny_original), dotted, value)
    with pytest.raises(CheckpointError) as err:
        parse_config(raw, "/models/x/config.json")
    text = one_line(err)
    leaf = dotted.split(".")[-1]
    named = leaf in text or dotted.split(".")[0] in text
    assert named or any(w in text for w in ("group size", "head size", "image size", "patches per tile")), text


@pytest.mark.parametrize("fields", [{"head_dim": 1024}, {"num_attention_heads": 64, "num_key_value_heads": 64, "head_dim": 1024}])
def test_attention_far_wider_than_the_hidden_size_is_refused(tiny_original, fields):
    """The KV cache (and the rotary tables) are sized by the attention's width, not by the weights:
    a 9 MB checkpoint whose config gave a hidden_size of 8 and 64 heads of 1,024 allocated 16 GiB of
    zeroed cache at the default context (the machine swapped, or "out of memory … use a 4-bit
    checkpoint"). Qwen2's attention is as wide as its hidden size."""
    raw = config_of(tiny_original)
    raw["llm_config"].update(fields)
    with pytest.raises(CheckpointError) as err:
        parse_config(raw, "/models/x/config.json")
    one_line(err, "/models/x/config.json", "llm_config", "head_dim", "hidden_size (64)")
    raw["llm_config"].update(num_attention_heads=4, num_key_value_heads=2, head_dim=16)  # as wide as hidden_size: fine
    parse_config(raw, "/models/x/config.json")


HF_LIES = [
    ("text_config.hidden_size", "64"), ("text_config", DELETE), ("text_config", 7), ("vision_config.image_size", [448, 224]),
    ("vision_config.patch_size", [14, "14"]), ("tie_word_embeddings", "yes"), ("vision_feature_layer", [-1]),
    ("vision_config.use_qk_norm", "no"), ("vision_config.attention_bias", 0), ("text_config.num_key_value_heads", 5),
    # variants transformers would compute and the engine does not: they loaded and answered wrongly
    ("projector_hidden_act", "relu"), ("projector_hidden_act", 1), ("vision_feature_select_strategy", "full"),
]  # fmt: skip


@pytest.mark.parametrize("dotted, value", HF_LIES, ids=[f"{d}={v!r}"[:60] for d, v in HF_LIES])
def test_hf_config_lies_are_one_line(tiny_hf, dotted, value):
    raw = edited(config_of(tiny_hf), dotted, value)
    with pytest.raises(CheckpointError) as err:
        parse_config(raw)
    one_line(err, dotted.split(".")[-1])


LONG = "X" * 100_000
LONG_NAMES = [
    ("architectures", [LONG]), ("model_type", LONG), ("llm_config.architectures", [LONG]),
    ("llm_config.model_type", LONG), ("llm_config.rope_scaling", {"type": LONG}),
    ("llm_config.quantization_config", {"quant_method": LONG}),
    ("llm_config.quantization_config", {"quant_method": "awq", "version": LONG}),
]  # fmt: skip


@pytest.mark.parametrize("dotted, value", LONG_NAMES, ids=[d + "." + str(type(v).__name__) + str(i) for i, (d, v) in enumerate(LONG_NAMES)])
def test_a_long_name_from_config_json_is_cut_short_in_the_error(tiny_original, dotted, value):
    """Unsupported architectures, model types, RoPE kinds and AWQ methods were shown whole: a
    100,000-character name made a 100,000-character error line."""
    raw = edited(config_of(tiny_original), dotted, value)
    if dotted.endswith("model_type"):  # shown when there are no architectures
        raw = edited(raw, dotted.replace("model_type", "architectures"), [])
    if dotted == "architectures":  # else the model type alone names the layout
        raw["model_type"] = "other"
    with pytest.raises(CheckpointError) as err:
        parse_config(raw, "/models/x/config.json")
    text = one_line(err)
    assert "xxxx" in text.lower() and len(text) < 300, text


def test_a_config_that_is_not_an_object(tmp_path):
    for value in ([], "InternVL", 3, None):
        with pytest.raises(CheckpointError) as err:
            parse_config(value, "cfg.json")
        one_line(err, "cfg.json", "JSON object")


def test_values_from_the_file_are_shown_escaped(tiny_original):
    raw = edited(config_of(tiny_original), "llm_config.hidden_size", "\x1b]0;pwned\x07" + "x" * 100)
    with pytest.raises(CheckpointError) as err:
        parse_config(raw)
    text = one_line(err, "hidden_size", "\\u001b]0;pwned\\u0007")
    assert len(text) < 300


# ------------------------------------------------------------------ config.json and index files


@pytest.mark.parametrize(
    "content, words",
    [
        (b"\xff\xfe{}", ["not UTF-8"]),
        (b'{"architectures": ["InternVLChatModel"],', ["not valid JSON"]),
        (b"[" * 200_000 + b"]" * 200_000, ["nested too deeply"]),
        (b'{"a": ' + b"9" * 50_000 + b"}", ["number is too large"]),
        (b'["InternVLChatModel"]', ["JSON object"]),
        (b"", ["not valid JSON"]),
    ],
)
def test_unreadable_config_json(tiny_original, tmp_path, content, words):
    folder = tmp_path / "m"
    shutil.copytree(tiny_original, folder)
    (folder / "config.json").write_bytes(content)
    with pytest.raises(CheckpointError) as err:
        load_config(folder)
    one_line(err, str(folder / "config.json"), *words)


def test_config_json_that_is_a_fifo_or_huge(tiny_original, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(tiny_original, folder)
    (folder / "config.json").unlink()
    os.mkfifo(folder / "config.json")  # would block forever if opened for a plain read
    with pytest.raises(CheckpointError) as err:
        load_config(folder)
    one_line(err, "not a regular file")
    (folder / "config.json").unlink()
    with open(folder / "config.json", "wb") as f:
        f.truncate(65 << 20)  # sparse: over the 64 MiB limit without using the disk
    with pytest.raises(CheckpointError) as err:
        load_config(folder)
    one_line(err, "limit")


@pytest.mark.parametrize("name", ["config.json", "model.safetensors.index.json", "tokenizer_config.json"])
def test_checkpoint_json_over_16_mib_is_refused_unparsed(tiny_original, tmp_path, name):
    """These files are a few KiB; up to 64 MiB of them were parsed, and Python's parser takes ~25
    bytes of memory per byte of `[{}, {}, …]`: 1.6 GB and seconds, per read (quantize reads
    config.json twice)."""
    folder = tmp_path / "m"
    shutil.copytree(tiny_original, folder)
    path = folder / name
    with open(path, "wb") as f:
        f.truncate(17 << 20)  # sparse: over 16 MiB without using the disk
    with pytest.raises(CheckpointError) as err:
        load_model(folder, device="cpu", dtype="float32", max_context=64)
    one_line(err, str(path), "17.0 MiB, over the 16 MiB limit")


@pytest.mark.parametrize("name", ["config.json", "tokenizer.json"])
@pytest.mark.parametrize("kind, words", [("broken link", "is a link to a file that does not exist"),
                                         ("folder", "is a folder"), ("fifo", "not a regular file")])  # fmt: skip
def test_a_config_or_tokenizer_that_is_no_file_is_named(tiny_original, tmp_path, name, kind, words):
    """An interrupted download into the Hugging Face cache leaves links to missing blobs: such a
    tokenizer.json was taken for none ('has no tokenizer files (tokenizer.json / tokenizer_config.json)'
    beside a tokenizer_config.json), such a config.json for no config.json."""
    folder = tmp_path / "m"
    shutil.copytree(tiny_original, folder)
    path = folder / name
    path.unlink()
    if kind == "broken link":
        path.symlink_to(tmp_path / "blobs" / "0d5f1e")
    elif kind == "folder":
        path.mkdir()
    else:
        os.mkfifo(path)  # would block forever if opened for a plain read
    with pytest.raises(CheckpointError) as err:
        load_model(folder, device="cpu", dtype="float32", max_context=64)
    one_line(err, str(path), words)


@pytest.mark.parametrize("fixture, name", [
    ("tiny_original", "tokenizer_config.json"), ("tiny_hf", "preprocessor_config.json"),
    ("tiny_original", "model.safetensors"), ("tiny_original", "model.safetensors.index.json"),
    ("tiny_original", "model-00002-of-00002.safetensors"),
])  # fmt: skip
def test_other_checkpoint_files_that_are_broken_links_are_named(request, tmp_path, fixture, name):
    """The same interrupted download, for the files read after config.json and tokenizer.json: a
    broken tokenizer_config.json or preprocessor_config.json link was skipped (its added tokens or
    tile limits silently lost), a broken model.safetensors link reported as a folder with no weights
    at all, a broken index link skipped for the loose shards beside it, a broken shard link skipped."""
    folder = tmp_path / "m"
    shutil.copytree(request.getfixturevalue(fixture), folder)
    path = folder / name
    if path.exists():
        path.unlink()
    if name.startswith("model-"):  # the other shard is there
        (folder / "model.safetensors").rename(folder / "model-00001-of-00002.safetensors")
    path.symlink_to(tmp_path / "blobs" / "0d5f1e")
    with pytest.raises(CheckpointError) as err:
        load_model(folder, device="cpu", dtype="float32", max_context=64)
    one_line(err, str(path), "is a link to a file that does not exist")


@pytest.mark.parametrize("name", ["model.safetensors", "model-00002-of-00002.safetensors", "pytorch_model.bin", "tokenizer.json"])
def test_a_git_lfs_pointer_in_place_of_a_file_says_to_pull_it(tiny_original, tmp_path, name):
    """A Hugging Face repository cloned without Git LFS holds a pointer of ~130 bytes in place of
    each large file: the weights were "not a safetensors file, or a damaged one (its header claims
    2,228,667,979,575 MiB …); download it again", tokenizer.json "expected value at line 1", and
    cloning again gives the same pointers."""
    folder = tmp_path / "m"
    shutil.copytree(tiny_original, folder)
    if name.startswith("model-"):  # the other shard is there
        (folder / "model.safetensors").rename(folder / "model-00001-of-00002.safetensors")
    if name == "pytorch_model.bin":  # no safetensors left: the loader looks for it
        (folder / "model.safetensors").unlink()
    path = folder / name
    path.write_text("version https://git-lfs.github.com/spec/v1\n"
                    "oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\nsize 5882160\n")  # fmt: skip
    with pytest.raises(CheckpointError) as err:
        load_model(folder, device="cpu", dtype="float32", max_context=64)
    assert one_line(err) == (f"{path} is a Git LFS pointer, not the file itself: the checkpoint was cloned without Git LFS; "
                             "run `git lfs install` and `git lfs pull` in its folder (or download it with `hf download`)")


@pytest.mark.parametrize("name", ["model.safetensors", "model-00002-of-00002.safetensors", "pytorch_model.bin", "model.pt",
                                  "indexed.safetensors"])  # fmt: skip
@pytest.mark.parametrize("kind, words", [("folder", "is a folder"), ("fifo", "is a pipe or a device"),
                                         ("device", "is a pipe or a device")])  # fmt: skip
def test_a_weight_file_that_is_no_file_is_named(tiny_original, tmp_path, name, kind, words):
    """A folder, a FIFO or a link to /dev/zero where a weight file belongs was skipped: reported as
    'no weights in … the download may be incomplete', or as a shard 'missing … download the
    remaining shards', sending the user to download what is there."""
    folder = tmp_path / "m"
    shutil.copytree(tiny_original, folder)
    (folder / "model.safetensors").rename(folder / "model-00001-of-00002.safetensors")
    if name == "model.safetensors":  # the only weight file
        (folder / "model-00001-of-00002.safetensors").unlink()
    if name in ("pytorch_model.bin", "model.pt"):  # no safetensors left: the loader looks for these
        (folder / "model-00001-of-00002.safetensors").unlink()
    if name == "indexed.safetensors":
        index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": name}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    path = folder / name
    if kind == "folder":
        path.mkdir()
    elif kind == "fifo":
        os.mkfifo(path)
    else:
        path.symlink_to("/dev/zero")
    with pytest.raises(CheckpointError) as err:
        find_weight_files(folder)
    one_line(err, str(path), words, "not a weight file")


@pytest.fixture(scope="module")
def sharded(tmp_path_factory, tiny_tokenizer) -> Path:
    from make_tiny_checkpoint import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("sharded"), file_format="sharded", tokenizer_dir=tiny_tokenizer)


@pytest.mark.parametrize(
    "weight_map, words",
    [
        ({"a": "../outside.safetensors"}, ["../outside.safetensors", "not a .safetensors file name"]),
        ({"a": "/etc/passwd.safetensors"}, ["/etc/passwd.safetensors"]),
        ({"a": "sub/model.safetensors"}, ["sub/model.safetensors"]),
        ({"a": "model.bin"}, ["model.bin"]),
        ({"a": 7}, ["7"]),
        ({"a": "x\x1b[2J.safetensors"}, ["x\\e[2J.safetensors"]),
        # longer than a file name can be: checking that it exists raised OSError (a traceback)
        ({"a": "x" * 300 + ".safetensors"}, ["xxxx…", "not a .safetensors file name"]),
        ([], ["weight_map"]),
        ({}, ["weight_map"]),
        ("model.safetensors", ["weight_map"]),
    ],
)
def test_lying_shard_index(sharded, tmp_path, weight_map, words):
    folder = tmp_path / "s"
    shutil.copytree(sharded, folder)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError) as err:
        find_weight_files(folder)
    one_line(err, str(folder / "model.safetensors.index.json"), *words)


def test_shard_index_that_is_a_fifo_or_not_json(sharded, tmp_path):
    folder = tmp_path / "s"
    shutil.copytree(sharded, folder)
    index = folder / "model.safetensors.index.json"
    index.write_bytes(b"\x00\x01 not json")
    with pytest.raises(CheckpointError) as err:
        find_weight_files(folder)
    one_line(err, str(index), "not valid JSON")
    index.unlink()
    os.mkfifo(index)
    with pytest.raises(CheckpointError) as err:
        find_weight_files(folder)
    one_line(err, str(index), "not a regular file")


def test_absurd_sizes_never_reach_an_allocator(tiny_original, tmp_path):
    """Each field within its cap, their product far beyond memory: refused by comparing with the
    bytes the weight files hold, before the model is built."""
    folder = tmp_path / "absurd"
    shutil.copytree(tiny_original, folder)
    raw = config_of(folder)
    raw["llm_config"].update(vocab_size=2_000_000, hidden_size=65_536, num_attention_heads=512, num_key_value_heads=512)
    (folder / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError) as err:
        load_model(folder, device="cpu", dtype="float32", max_context=64)
    one_line(err, str(folder), "billion weights", "config.json and the weights disagree")


def test_a_larger_but_plausible_config_is_refused_by_size_too(tiny_original, tmp_path):
    folder = tmp_path / "more"
    shutil.copytree(tiny_original, folder)
    raw = config_of(folder)
    raw["llm_config"]["num_hidden_layers"] = 200  # a partial download of a deeper model, say
    (folder / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError) as err:
        load_model(folder, device="cpu", dtype="float32", max_context=64)
    one_line(err, "config.json and the weights disagree")


def _with_weights(tiny_original: Path, folder: Path, edit) -> Path:
    """A copy of the tiny checkpoint whose single safetensors file has `edit(state)` applied."""
    from safetensors.torch import load_file

    shutil.copytree(tiny_original, folder)
    state = load_file(folder / "model.safetensors")
    edit(state)
    save_file(state, folder / "model.safetensors")
    return folder


def test_a_vocabulary_smaller_than_the_tokenizer(tiny_original, tmp_path):
    """config.json and the embedding rows agree on 300 tokens, but the tokenizer's chat tokens have
    ids above that: the first prompt would index past the embeddings (an IndexError traceback).
    (Special, but what prompts are built of: not placeholders a processor replaces.)"""

    def shrink(state):
        for name in ("language_model.model.embed_tokens.weight", "language_model.lm_head.weight"):
            state[name] = state[name][:300].contiguous()

    folder = _with_weights(tiny_original, tmp_path / "small vocab", shrink)
    raw = config_of(folder)
    raw["llm_config"]["vocab_size"] = 300
    (folder / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError) as err:
        load_model(folder, device="cpu", dtype="float32", max_context=64)
    one_line(err, str(folder), "vocab_size", "300", "tokenizer")


@pytest.mark.parametrize("layout", ["tiny_original", "tiny_hf"])
def test_a_special_placeholder_past_the_vocabulary_loads_and_stays_text(layout, request, tmp_path):
    """The published -hf InternVL3 tokenizers add `<video>` (special) at 151674, one past the
    151,674 embedding rows: a processor's placeholder, replaced before the model sees it. Such
    checkpoints were refused as another model's tokenizer. Now they load, and `<video>` typed in a
    chat or sent in a raw /v1/completions prompt stays text (no id past the rows is made)."""
    from internvl_chat.engine.tokenizer import load_tokenizer
    from internvl_chat.serve.text_completions import encode_prompt_text

    folder = tmp_path / "with video"
    shutil.copytree(request.getfixturevalue(layout), folder)
    raw = config_of(folder)
    rows = raw["llm_config"]["vocab_size"] if "llm_config" in raw else raw["text_config"]["vocab_size"]
    data = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    size = len(data["model"]["vocab"]) + len(data["added_tokens"])  # the tiny rows have room to spare: fill it
    assert max(t["id"] for t in data["added_tokens"]) == size - 1 < rows
    fill = [f"<unused_{i}>" for i in range(size, rows)]
    for token_id, content in enumerate([*fill, "<video>"], start=size):
        data["added_tokens"].append({"id": token_id, "content": content, "single_word": False, "lstrip": False,
                                     "rstrip": False, "normalized": False, "special": True})  # fmt: skip
    (folder / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    assert load_tokenizer(folder).convert_tokens_to_ids("<video>") == rows
    loaded = load_model(folder, device="cpu", dtype="float32", max_context=64)
    tokenizer = loaded.tokenizer
    assert rows not in tokenizer.special_ids
    for ids in (tokenizer.encode("a <video> b"), encode_prompt_text(tokenizer, "a <video> b<|im_end|>")):
        assert ids and max(ids) < rows
        assert "<video>" in tokenizer.decode(ids)


def test_two_tokens_with_one_id_are_refused(tiny_original, tmp_path):
    """tokenizer.json loads a vocabulary in which two tokens share an id: one of them then encoded
    as the other, and the id it had decoded to nothing, without a word. (Two the tokenizer's
    round-trip check does not use: it would refuse the file first, in less precise words.)"""
    from tokenizers import Tokenizer

    from internvl_chat.engine.tokenizer import ROUND_TRIP_PROBE

    folder = tmp_path / "shared id"
    shutil.copytree(tiny_original, folder)
    data = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = data["model"]["vocab"]
    backend = Tokenizer.from_str(json.dumps(data))
    backend.encode_special_tokens = True  # as the app encodes: typed special-token text stays text
    probed = set(backend.encode(ROUND_TRIP_PROBE, add_special_tokens=False).ids)
    first, second = [token for token, token_id in vocab.items() if token_id not in probed][:2]
    vocab[first] = vocab[second]
    (folder / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(CheckpointError) as err:
        load_model(folder, device="cpu", dtype="float32", max_context=64)
    one_line(err, str(folder), f"gives the id {vocab[second]} to both", "tokenizer files are damaged")


def _grow_vocabulary(data: dict, vocab_size: int) -> None:
    vocab = data["model"]["vocab"]
    vocab.update((f"x{i:x}", len(vocab) + i) for i in range(3 * vocab_size + 70_000))


def _grow_merges(data: dict, vocab_size: int) -> None:
    merges = data["model"]["merges"]
    merges.extend(merges[i % len(merges)] for i in range(5 * vocab_size + 70_000))


@pytest.mark.parametrize("grow, words", [(_grow_vocabulary, "vocabulary entries"), (_grow_merges, "entries and merges")])
def test_a_tokenizer_far_larger_than_the_vocabulary_is_refused_unparsed(tiny_original, tmp_path, monkeypatch, grow, words):
    """A tokenizer.json of 2.4 million entries (39 MiB, within the file limit) took 1.3 GB and 13 s
    to parse and build before its ids were found past vocab_size; as many merges (repeated ones
    among them) loaded. Both are refused from a count of the text, before the backend parses it."""
    import tokenizers

    folder = tmp_path / "huge"
    shutil.copytree(tiny_original, folder)
    vocab_size = config_of(folder)["llm_config"]["vocab_size"]
    data = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    grow(data, vocab_size)
    (folder / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")

    def no_parse(text):
        raise AssertionError("the backend parsed the file")

    monkeypatch.setattr(tokenizers.Tokenizer, "from_str", no_parse)
    with pytest.raises(CheckpointError) as err:
        load_model(folder, device="cpu", dtype="float32", max_context=64)
    one_line(err, str(folder / "tokenizer.json"), words, f"vocab_size of {vocab_size:,}", "use the one shipped")


def _no_tokenizer(monkeypatch) -> None:
    """The tokenizer files must not be parsed at all: the refusal comes before them."""
    import tokenizers

    from internvl_chat.engine import loader

    def parse(*args, **kwargs):
        raise AssertionError("the tokenizer was parsed before the refusal")

    monkeypatch.setattr(loader, "load_tokenizer", parse)
    monkeypatch.setattr(tokenizers.Tokenizer, "from_str", parse)


def test_the_largest_vocabulary_on_small_weights_is_refused_before_the_tokenizer(tiny_original, tmp_path, monkeypatch):
    """config.json's vocab_size bounds how many entries tokenizer.json may hold. Declaring the
    largest one (2,097,152) with a hidden_size of 2 asks for only ~2 MiB of weights, which any
    tensor could fill, so the byte check passed and a tokenizer.json of millions of entries was
    parsed (~23 s, ~2.3 GB) before anything compared the embeddings: now their header refuses it."""
    from internvl_chat.engine.config import MAX_VOCAB

    def pad(state):  # enough bytes for the byte check, in a tensor that is no embedding
        state["padding"] = torch.zeros(MAX_VOCAB, dtype=torch.float16)

    folder = _with_weights(tiny_original, tmp_path / "huge vocab", pad)
    raw = config_of(folder)
    raw["llm_config"].update(vocab_size=MAX_VOCAB, hidden_size=2, num_attention_heads=1, num_key_value_heads=1,
                             intermediate_size=2)  # fmt: skip
    (folder / "config.json").write_text(json.dumps(raw))
    data = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    _grow_vocabulary(data, 100_000)  # far more than the 512 real rows allow, within what 2 million would
    (folder / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    _no_tokenizer(monkeypatch)
    with pytest.raises(CheckpointError) as err:
        load_model(folder, device="cpu", dtype="float32", max_context=64)
    one_line(err, str(folder / "model.safetensors"), "language_model.model.embed_tokens.weight", "[512, 64]",
             f"[{MAX_VOCAB}, 2]", "config.json and the weights disagree")  # fmt: skip


def _retyped(name: str, dtype: torch.dtype):
    def edit(state):
        state[name] = state[name].to(dtype)

    return edit


def _cut(name: str, rows: int):
    def edit(state):
        state[name] = state[name][:rows].contiguous()

    return edit


EMBED, LM_HEAD = "language_model.model.embed_tokens.weight", "language_model.lm_head.weight"
EMBEDDING_LIES = {
    # config.json's vocab_size against the rows the embeddings really have (512), either way
    "more rows in config.json": (lambda s: None, 576, [EMBED, "[512, 64]", "[576, 64]"]),
    "fewer rows in config.json": (lambda s: None, 448, [EMBED, "[512, 64]", "[448, 64]"]),
    "a shorter lm_head": (_cut(LM_HEAD, 448), None, [LM_HEAD, "[448, 64]", "[512, 64]"]),
    # bytes to count a row by: one per element would halve what a row costs on disk
    "integer embeddings": (_retyped(EMBED, torch.int8), None, [EMBED, "int8", "not as floats"]),
    "no embeddings at all": (lambda s: [s.pop(EMBED), s.pop(LM_HEAD)], None, ["no token embeddings", "incomplete"]),
}


@pytest.mark.parametrize("case", list(EMBEDDING_LIES))
def test_embeddings_that_disagree_with_vocab_size_are_refused_before_the_tokenizer(tiny_original, tmp_path, monkeypatch, case):
    """The model is built with [vocab_size, hidden_size] embeddings and lm_head, so anything else
    failed only after the tokenizer was parsed and the model allocated; it is read from the header."""
    edit, vocab_size, words = EMBEDDING_LIES[case]
    folder = _with_weights(tiny_original, tmp_path / "lying embeddings", edit)
    if vocab_size is not None:
        raw = config_of(folder)
        raw["llm_config"]["vocab_size"] = vocab_size
        (folder / "config.json").write_text(json.dumps(raw))
    _no_tokenizer(monkeypatch)
    with pytest.raises(CheckpointError) as err:
        load_model(folder, device="cpu", dtype="float32", max_context=64)
    one_line(err, str(folder), *words)


@pytest.mark.parametrize("layout, file_format, stored", [
    ("hf", "safetensors", "model.language_model.embed_tokens.weight"),  # the -hf names are found too
    ("hf", "sharded", "model.language_model.embed_tokens.weight"),
    ("original", "bin", EMBED),  # pickles declare their shapes when loaded memory-mapped
])  # fmt: skip
def test_every_layout_names_its_embeddings_when_vocab_size_lies(tiny_tokenizer, tmp_path, monkeypatch, layout, file_format, stored):
    from make_tiny_checkpoint import make_tiny_checkpoint

    folder = make_tiny_checkpoint(tmp_path / "lying", layout=layout, file_format=file_format, tokenizer_dir=tiny_tokenizer)
    raw = config_of(folder)
    text = raw["llm_config" if layout == "original" else "text_config"]
    text["vocab_size"] += 64
    (folder / "config.json").write_text(json.dumps(raw))
    _no_tokenizer(monkeypatch)
    with pytest.raises(CheckpointError) as err:
        load_model(folder, device="cpu", dtype="float32", max_context=64)
    one_line(err, str(folder), stored, f"[{text['vocab_size']}, 64]", "config.json and the weights disagree")


# (an embedding of the wrong shape is refused earlier still, from the header: test_an_embedding_that_disagrees_with_vocab_size)
@pytest.mark.parametrize("name", ["language_model.model.norm.weight", "junk"])
def test_a_tensor_larger_than_the_model_is_refused_before_it_is_read(tiny_original, tmp_path, monkeypatch, name):
    """A header whose shapes agree with its offsets can still lie to the config: each tensor was read
    into a buffer of the size the header declares, and only then compared. A file of sparse zeros
    (`truncate -s 40G`) declaring one huge tensor filled the memory that way."""
    from internvl_chat.engine import tensor_reader

    def grow(state):
        state[name] = torch.zeros(4 * state["language_model.model.embed_tokens.weight"].numel())

    folder = _with_weights(tiny_original, tmp_path / "big", grow)
    model = load_model(tiny_original, device="cpu", dtype="float32", max_context=64).model
    largest = max(t.numel() for t in model.state_dict().values())
    sizes: list[int] = []
    monkeypatch.setattr(tensor_reader, "bytearray", lambda n: sizes.append(n) or bytearray(n), raising=False)
    with pytest.raises(CheckpointError) as err:
        load_model(folder, device="cpu", dtype="float32", max_context=64)
    one_line(err, str(folder), name, "larger than any tensor", "config.json and the weights disagree")
    assert max(sizes, default=0) <= 4 * largest  # this file stores nothing wider than float32


def test_a_pickled_tensor_larger_than_the_model_is_refused_before_it_is_used(tiny_hf, tmp_path):
    """A pickle stores each tensor's shape and strides beside its storage: zero strides make a tensor
    of any shape from one stored element, loaded memory-mapped for nothing. The -hf vision q/k/v are
    concatenated before any shape is compared, so a 650 KB .bin whose q, k and v were (20000, 20000)
    made 2.6 GB (and larger ones all the memory there was, or "out of memory … use a 4-bit
    checkpoint"). Pickled tensors are held to the model's largest, as safetensors ones are."""
    from safetensors.torch import load_file

    folder = shutil.copytree(tiny_hf, tmp_path / "hf")
    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    for piece in ("q_proj", "k_proj", "v_proj"):
        state[HF_QKV.replace("q_proj", piece) + "weight"] = torch.zeros(1, dtype=torch.bfloat16).expand(3000, 3000)
    torch.save(state, folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError) as err:
        load_model(folder, device="cpu", dtype="float32", max_context=64)
    one_line(err, "pytorch_model.bin", HF_QKV.removesuffix("q_proj."), "[3000, 3000]", "larger than any tensor")


def test_a_long_unexpected_tensor_name_is_cut_short(tiny_original, tmp_path):
    """A header may name a tensor with 100,000 characters; the error listing unexpected tensors
    showed it whole."""

    def add(state):
        state["\x1b[2J" + "z" * 100_000] = torch.zeros(2)

    folder = _with_weights(tiny_original, tmp_path / "long", add)
    with pytest.raises(CheckpointError) as err:
        load_model(folder, device="cpu", dtype="float32", max_context=64)
    assert len(one_line(err, "unexpected tensor", "\\e[2Jzzzz")) < 300


@pytest.mark.parametrize("dtype", [torch.int8, torch.int32, torch.bool, torch.uint8])
def test_integer_or_bool_weights_for_a_float_parameter(tiny_original, tmp_path, dtype):
    """A dense weight stored as integers or bools is a damaged or mislabelled file: it used to be
    cast silently (a model that answers garbage); now it is one line naming the tensor."""
    name = "language_model.model.layers.0.self_attn.q_proj.weight"

    def retype(state):
        state[name] = state[name].to(dtype)

    folder = _with_weights(tiny_original, tmp_path / "ints", retype)
    with pytest.raises(CheckpointError) as err:
        load_model(folder, device="cpu", dtype="float32", max_context=64)
    one_line(err, name, str(dtype).removeprefix("torch."))


HF_QKV = "model.vision_tower.encoder.layer.0.attention.q_proj."
HF_QKV_LIES = {
    # torch.cat of the pieces failed with its own RuntimeError (a traceback)
    "narrower": ("weight", lambda t: t[:, :32], ["[64, 32]"]),
    "one-dimensional": ("weight", lambda t: t[0], ["[64]"]),
    "a scalar bias": ("bias", lambda t: t[0], ["q []"]),
    # torch.cat promoted them to floats, so they loaded as a garbage model
    "int32": ("weight", lambda t: t.to(torch.int32), ["int32"]),
    "bool": ("weight", lambda t: t.bool(), ["bool"]),
}


@pytest.mark.parametrize("case", list(HF_QKV_LIES))
def test_hf_vision_qkv_pieces_that_do_not_fit_together(tiny_hf, tmp_path, case):
    """The -hf layout splits the ViT's fused qkv into q/k/v pieces, fused back on reading."""
    leaf, change, words = HF_QKV_LIES[case]

    def edit(state):
        state[HF_QKV + leaf] = change(state[HF_QKV + leaf]).contiguous()

    folder = _with_weights(tiny_hf, tmp_path / "hf", edit)
    with pytest.raises(CheckpointError) as err:
        load_model(folder, device="cpu", dtype="float32", max_context=64)
    one_line(err, f"attn.qkv.{leaf}", "do not fit together", *words)


@pytest.mark.parametrize("leaf", ["weight", "bias"])
def test_hf_vision_qkv_pieces_of_unequal_rows_that_add_up(tiny_hf, tmp_path, leaf):
    """InternViT's q, k and v are each hidden_size rows (transformers refuses other pieces: each is
    a hidden×hidden Linear). k and v pieces of 32 and 96 rows filled the fused qkv's 192 rows
    exactly, so a file no -hf writer makes passed as sound, whatever the rows held."""
    prefix = HF_QKV.removesuffix("q_proj.")

    def edit(state):
        both = torch.cat([state[prefix + f"k_proj.{leaf}"], state[prefix + f"v_proj.{leaf}"]])
        state[prefix + f"k_proj.{leaf}"], state[prefix + f"v_proj.{leaf}"] = both[:32].clone(), both[32:].clone()

    folder = _with_weights(tiny_hf, tmp_path / "hf", edit)
    with pytest.raises(CheckpointError) as err:
        load_model(folder, device="cpu", dtype="float32", max_context=64)
    one_line(err, f"attn.qkv.{leaf}", "do not fit together", "k [32", "v [96")


def test_an_hf_vision_qkv_piece_stored_twice(tiny_hf, tmp_path):
    """A q piece in two shards: read before its k and v, the second copy silently replaced the
    first; read after them, it was blamed as a missing k and v. Both are named as any other tensor
    stored twice."""
    from safetensors.torch import load_file

    name = HF_QKV + "weight"
    for extra in ("model-0.safetensors", "model-9.safetensors"):  # read before, after the others
        folder = tmp_path / extra
        shutil.copytree(tiny_hf, folder)
        save_file({name: load_file(folder / "model.safetensors")[name] * 2}, folder / extra)
        (folder / "model.safetensors").rename(folder / "model-5.safetensors")
        with pytest.raises(CheckpointError) as err:
            load_model(folder, device="cpu", dtype="float32", max_context=64)
        one_line(err, name, "twice")


def test_nan_weights_in_float32_are_blamed_on_the_file_and_the_conversation_goes_on(tiny_original, tmp_path):
    """A weight full of NaN (a damaged file whose header is sound) made every answer fail with
    'usually a numeric overflow in half precision; try --dtype float32', already in float32."""
    from internvl_chat.chat.sampling import SamplingParams
    from internvl_chat.chat.session import Session
    from internvl_chat.errors import GenerationError

    def poison(state):
        state["language_model.model.norm.weight"] = torch.full_like(state["language_model.model.norm.weight"], float("nan"))

    folder = _with_weights(tiny_original, tmp_path / "nan", poison)
    session = Session(load_model(folder, device="cpu", dtype="float32", max_context=256), SamplingParams(max_new_tokens=3))
    with pytest.raises(GenerationError) as err:
        list(session.ask("Hello."))
    one_line(err, "float32", "weights", "re-download")
    assert "--dtype float32" not in str(err.value) and session.turns == [] and session.ids == []


@pytest.fixture(scope="module")
def tiny_awq(tiny_original, tmp_path_factory) -> Path:
    from internvl_chat.quantize import quantize_checkpoint

    return quantize_checkpoint(tiny_original, tmp_path_factory.mktemp("awq") / "w4", "rtn", group_size=32, device="cpu")


AWQ_LIES = [
    # q/k/v are fused by concatenation, which promoted int or bool scales (and biases) to float16
    ("q_proj.scales", lambda t: t.to(torch.int32), ["q_proj", "scales", "float"]),
    ("k_proj.scales", lambda t: t.bool(), ["k_proj", "scales", "float"]),
    ("q_proj.bias", lambda t: t.to(torch.int32), ["q_proj", "bias", "int32"]),
    # shape errors name the linear, not only "cannot fuse"
    ("v_proj.qweight", lambda t: t[:, :-1], ["v_proj"]),
    ("q_proj.scales", lambda t: t.reshape(-1), ["q_proj", "2-D"]),
    # a bias of the wrong shape: a UsageError naming no tensor ("bias has shape (72,)…"), or a
    # RuntimeError traceback from concatenating a 2-D one
    ("q_proj.bias", lambda t: t[:8], ["q_proj.bias", "(8,)", "64 outputs"]),
    ("k_proj.bias", lambda t: t.reshape(4, 8), ["k_proj.bias", "(4, 8)", "32 outputs"]),
    ("v_proj.bias", lambda t: t[0], ["v_proj.bias", "()"]),
]  # fmt: skip


@pytest.mark.parametrize("leaf, change, words", AWQ_LIES, ids=[f"{leaf}-{i}" for i, (leaf, *_) in enumerate(AWQ_LIES)])
def test_lying_awq_parts_of_a_fused_linear(tiny_awq, tmp_path, leaf, change, words):
    name = f"language_model.model.layers.0.self_attn.{leaf}"

    def edit(state):
        state[name] = change(state[name]).contiguous()

    folder = _with_weights(tiny_awq, tmp_path / "awq", edit)
    with pytest.raises(CheckpointError) as err:
        load_model(folder, device="cpu", dtype="float32", max_context=64)
    one_line(err, *words)


@pytest.mark.parametrize("bias", [torch.tensor(1.0), torch.zeros(10), torch.zeros(128, 2)], ids=["scalar", "short", "2-D"])
def test_a_tinychat_fused_qkv_bias_of_the_wrong_shape(tiny_original, bias):
    """A TinyChat file stores q/k/v biases fused, split here by the config's widths: a scalar one
    raised IndexError (a traceback), a short or 2-D one was cut into parts of the wrong shapes."""
    import dataclasses

    from internvl_chat.engine.config import QuantConfig
    from internvl_chat.engine.tinychat import convert_tinychat

    cfg = dataclasses.replace(load_config(tiny_original), quant=QuantConfig(group_size=64))
    name = "language_model.model.layers.0.self_attn.qkv_proj.bias"
    with pytest.raises(CheckpointError) as err:
        list(convert_tinychat([(name, bias)], cfg))
    one_line(err, name, str(tuple(bias.shape)), "(128,)")


def test_a_tinychat_qweight_of_the_wrong_type_names_its_linear():
    from internvl_chat.quant.awq_format import tinychat_v2_to_awq

    with pytest.raises(CheckpointError) as err:
        tinychat_v2_to_awq(torch.zeros(2, 64, dtype=torch.int32), torch.ones(1, 8), torch.zeros(1, 8), 64, 8, 64, name="m.o_proj")
    one_line(err, "m.o_proj", "int32", "damaged")


# ------------------------------------------------------------------ safetensors headers


def _safetensors_bytes(header, data: bytes = b"", length: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


F32x2 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}

LYING_HEADERS = {
    "not an object": _safetensors_bytes([1, 2]),
    "a string": _safetensors_bytes("tensors"),
    "missing offsets": _safetensors_bytes({"a": {"dtype": "F32", "shape": [2]}}, bytes(8)),
    "inverted offsets": _safetensors_bytes({"a": {**F32x2, "data_offsets": [8, 0]}}, bytes(8)),
    "negative offset": _safetensors_bytes({"a": {**F32x2, "data_offsets": [-8, 0]}}, bytes(8)),
    "bytes != shape x dtype": _safetensors_bytes({"a": {**F32x2, "shape": [3]}}, bytes(8)),
    "offsets past the end": _safetensors_bytes({"a": {**F32x2, "shape": [4], "data_offsets": [0, 16]}}, bytes(8)),
    "data past the offsets": _safetensors_bytes({"a": F32x2}, bytes(12)),
    "a hole between tensors": _safetensors_bytes({"a": F32x2, "b": {**F32x2, "data_offsets": [12, 20]}}, bytes(20)),
    "overlapping tensors": _safetensors_bytes({"a": F32x2, "b": F32x2}, bytes(8)),
    "deep nesting": _safetensors_bytes(b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
    "huge header length": _safetensors_bytes({"a": F32x2}, bytes(8), length=1 << 40),
    "header length past the end": _safetensors_bytes({"a": F32x2}, bytes(8), length=5000),
    "header length zero": _safetensors_bytes(b"", bytes(8)),
    "invalid UTF-8": _safetensors_bytes(b'{"\xff": 1}'),
    "unknown dtype": _safetensors_bytes({"a": {**F32x2, "dtype": "F33"}}, bytes(8)),
    "negative shape": _safetensors_bytes({"a": {**F32x2, "shape": [-2]}}, bytes(8)),
    "shape overflow": _safetensors_bytes({"a": {**F32x2, "shape": [2**62, 2**62]}}, bytes(8)),
    "metadata not strings": _safetensors_bytes({"__metadata__": {"format": 1}, "a": F32x2}, bytes(8)),
    "seven bytes": b"\x05\x00\x00\x00\x00\x00\x00",
    "empty": b"",
}


@pytest.mark.parametrize("case", list(LYING_HEADERS))
def test_lying_safetensors_header_is_one_line(tiny_original, tmp_path, case):
    folder = tmp_path / "lie"
    shutil.copytree(tiny_original, folder)
    path = folder / "model.safetensors"
    path.write_bytes(LYING_HEADERS[case])
    with pytest.raises(CheckpointError) as err:
        list(iter_tensors(folder))
    text = one_line(err, str(path), "safetensors")
    with pytest.raises(CheckpointError) as err:  # the loader refuses before building the model
        load_model(folder, device="cpu", dtype="float32", max_context=64)
    assert one_line(err, str(path)).split(" (")[0] == text.split(" (")[0]


def test_a_header_larger_than_any_checkpoint_needs_is_refused_unparsed(tiny_original, tmp_path, monkeypatch):
    """The library parses headers of up to 100 MB: ~1.5 million tensor entries, which took ~1.5 GB
    and tens of seconds to parse and list (twice). 16 MiB is ~50 times what InternVL3-78B needs."""
    from internvl_chat.engine import tensor_reader

    folder = tmp_path / "big header"
    shutil.copytree(tiny_original, folder)
    path = folder / "model.safetensors"
    data = path.read_bytes()
    length = struct.unpack("<Q", data[:8])[0]
    header = data[8 : 8 + length] + b" " * (17 << 20)  # whitespace padding, which the format allows
    path.write_bytes(struct.pack("<Q", len(header)) + header + data[8 + length :])
    parsed: list[str] = []
    real = tensor_reader.safe_open
    monkeypatch.setattr(tensor_reader, "safe_open", lambda name, **kw: parsed.append(name) or real(name, **kw))
    with pytest.raises(CheckpointError) as err:
        load_model(folder, device="cpu", dtype="float32", max_context=64)
    one_line(err, str(path), "safetensors", "17 MiB")
    assert parsed == []


def test_a_dtype_the_engine_does_not_load(tiny_original, tmp_path):
    folder = tmp_path / "f8"
    shutil.copytree(tiny_original, folder)
    path = folder / "model.safetensors"
    path.write_bytes(_safetensors_bytes({"a": {"dtype": "F8_E4M3", "shape": [8], "data_offsets": [0, 8]}}, bytes(8)))
    with pytest.raises(CheckpointError) as err:
        list(iter_tensors(folder))
    one_line(err, str(path), "F8_E4M3")


def test_an_honest_file_still_reads_exactly(tmp_path):
    tensors = {
        "b": torch.arange(12, dtype=torch.bfloat16).reshape(3, 4),
        "a": torch.tensor([1.5, -2.0], dtype=torch.float32),
        "empty": torch.zeros(0, 5, dtype=torch.float16),
        "ids": torch.tensor([[7, 8]], dtype=torch.int32),
    }
    save_file(tensors, str(tmp_path / "w.safetensors"), metadata={"format": "pt"})
    got = dict(iter_tensors(tmp_path / "w.safetensors", "original"))
    assert set(got) == set(tensors)
    for name, tensor in tensors.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), name


def test_a_weight_file_that_is_a_fifo(tiny_original, tmp_path):
    from internvl_chat.engine.tensor_reader import iter_file

    fifo = tmp_path / "model.safetensors"
    os.mkfifo(fifo)
    for kind in ("safetensors", "bin"):
        with pytest.raises(CheckpointError) as err:
            list(iter_file(fifo, kind))
        one_line(err, str(fifo), "not a regular file")


# ------------------------------------------------------------------ pickles


def _pickles(folder: Path) -> dict[str, tuple[Path, list[str]]]:
    """name -> (file, words the refusal must contain)."""
    out = {}

    def save(name: str, obj, words: list[str], **kw) -> None:
        path = folder / name / "pytorch_model.bin"
        path.parent.mkdir()
        torch.save(obj, path, **kw)
        out[name] = (path, words)

    save("zip global", {"w": torch.zeros(2), "p": Path("x")}, ["pathlib.PosixPath", "for safety"])
    save("legacy global", {"w": torch.zeros(2), "p": Path("x")}, ["pathlib.PosixPath"], _use_new_zipfile_serialization=False)
    save("nested dict", {"w": torch.zeros(2), "meta": {"step": 3}}, ["meta", "dict", "not a tensor"])
    save("nested number", {"w": torch.zeros(2), "step": 3}, ["step", "int"])
    save("legacy nested", {"w": torch.zeros(2), "names": ["a"]}, ["names", "list"], _use_new_zipfile_serialization=False)
    save("a list", [torch.zeros(2)], ["list", "not a state dict"])
    save("a tensor", torch.zeros(2), ["Tensor", "not a state dict"])
    save("int key", {1: torch.zeros(2)}, ["not a string"])
    save("sparse", {"w": torch.eye(3).to_sparse()}, ["w", "sparse"])
    save("complex", {"w": torch.zeros(2, dtype=torch.complex64)}, ["complex64"])
    good = folder / "good.bin"
    torch.save({"w": torch.arange(1000.0)}, good)
    data = good.read_bytes()
    for name, content, words in [
        ("truncated zip", data[: len(data) // 2], ["truncated, damaged or not a PyTorch weights file"]),
        ("zip missing its end", data[:-10], ["truncated, damaged or not a PyTorch weights file"]),
        ("garbage", bytes(range(256)) * 4, ["not a PyTorch weights file"]),
        ("empty", b"", ["not a PyTorch weights file"]),
        ("plain pickle of an object", pickle.dumps(collections.Counter(a=1)), ["for safety"]),
    ]:
        path = folder / name / "pytorch_model.bin"
        path.parent.mkdir()
        path.write_bytes(content)
        out[name] = (path, words)
    return out


def test_pickles_that_are_not_plain_tensor_dicts(tmp_path):
    for name, (path, words) in _pickles(tmp_path).items():
        with pytest.raises(CheckpointError) as err:
            list(iter_tensors(path.parent, "original"))
        text = one_line(err, str(path), *words)
        assert "weights_only" not in text and "add_safe_globals" not in text, (name, text)


def test_plain_pickles_still_load_zip_and_legacy(tmp_path):
    state = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.tensor([1, 2], dtype=torch.int32)}
    for legacy in (False, True):
        folder = tmp_path / f"legacy{legacy}"
        folder.mkdir()
        torch.save(state, folder / "pytorch_model.bin", _use_new_zipfile_serialization=not legacy)
        got = dict(iter_tensors(folder, "original"))
        assert set(got) == set(state) and all(torch.equal(got[k], v) for k, v in state.items())
    wrapped = tmp_path / "wrapped"
    wrapped.mkdir()
    torch.save({"state_dict": state, "epoch": 3}, wrapped / "pytorch_model.bin")  # training checkpoints
    assert set(dict(iter_tensors(wrapped, "original"))) == set(state)


# ------------------------------------------------------------------ through the command line: exit 2, one line


def _tampered(tiny_original: Path, folder: Path, case: str) -> Path:
    shutil.copytree(tiny_original, folder)
    if case == "config":
        raw = config_of(folder)
        raw["llm_config"]["vocab_size"] = "151674"
        (folder / "config.json").write_text(json.dumps(raw))
    elif case == "safetensors":
        (folder / "model.safetensors").write_bytes(LYING_HEADERS["inverted offsets"])
    else:
        (folder / "model.safetensors").unlink()
        torch.save({"w": torch.zeros(2), "p": Path("x")}, folder / "pytorch_model.bin")
    return folder


@pytest.mark.parametrize("case", ["config", "safetensors", "pickle"])
def test_cli_refuses_with_exit_2_and_one_line(tiny_original, tmp_path, case):
    folder = _tampered(tiny_original, tmp_path / "bad model", case)
    run = subprocess.run(
        [sys.executable, "-m", "internvl_chat.cli", "--model", str(folder), "--device", "cpu", "-p", "hi"],
        capture_output=True, text=True, timeout=300, cwd=REPO, stdin=subprocess.DEVNULL,
        env={**os.environ, "HOME": str(tmp_path / "home"), "INTERNVL_CHAT_CONFIG": ""},
    )  # fmt: skip
    assert run.returncode == 2, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("internvl-chat: error: "), run.stderr
    assert str(folder) in lines[0] and "weights_only" not in lines[0]


def test_a_weight_file_opened_as_a_folder_is_called_a_folder(tmp_path):
    # a folder swapped in after the weight files were found was "not a regular file (a pipe or a device?)"
    from internvl_chat.engine.tensor_reader import open_regular

    with pytest.raises(CheckpointError) as err:
        open_regular(tmp_path, "weight file")
    one_line(err, f"weight file {tmp_path} is a folder, not a file")


def test_a_shared_id_is_named_alike_whatever_order_the_vocabulary_comes_in(tmp_path):
    # get_vocab()'s order may change from one start to the next: the same damaged files, the same line
    from internvl_chat.engine.loader import _refuse_shared_ids

    items = [("zeta", 7), ("alpha", 3), ("beta", 7), ("gamma", 3), ("delta", 1)]
    said = set()
    for order in (items, items[::-1], sorted(items), items[2:] + items[:2]):
        with pytest.raises(CheckpointError) as err:
            _refuse_shared_ids(dict(order), tmp_path)
        said.add(str(err.value))
    assert said == {f"the tokenizer of {tmp_path} gives the id 3 to both 'alpha' and 'gamma'; the tokenizer files are "
                    "damaged (re-download them)"}  # fmt: skip


@pytest.mark.parametrize("template", ["Hermes-2", "internlm2-chat", "phi3-chat", "\x1b[31mred"])
def test_a_chat_template_we_do_not_build_is_refused_by_name(tiny_original, template):
    """config.json's `template` names the prompt format InternVL's own code builds; it was read and
    never used, so InternVL2-1B's Hermes-2 (another system prompt) or any other ran as internvl2_5.
    The name is shown escaped."""
    raw = edited(config_of(tiny_original), "template", template)
    with pytest.raises(CheckpointError) as err:
        parse_config(raw, "/models/x/config.json")
    text = one_line(err, "/models/x/config.json", "template", "internvl2_5", "InternVL3")
    assert "\x1b" not in text and (template in text or "\\x1b" in text)


@pytest.mark.parametrize("template", ["internvl2_5", None, DELETE])
def test_the_internvl2_5_template_loads(tiny_original, template):
    raw = edited(config_of(tiny_original), "template", template)
    assert parse_config(raw, "/models/x/config.json").template == "internvl2_5"


@pytest.mark.parametrize("file_format, num_shards", [("bin", 1), ("bin", 2)])
def test_a_pickle_checkpoint_is_loaded_once_for_its_checks_and_once_for_its_weights(tiny_tokenizer, tmp_path, monkeypatch,
                                                                                    file_format, num_shards):  # fmt: skip
    """The embeddings check and the 4-bit check each loaded every .bin again (memory-mapped, the
    pickle parsed each time) before the weights were loaded: three loads of each file. The names
    and shapes are read once (weight_files.payload), the weights once; the checks still refuse."""
    from make_tiny_checkpoint import make_tiny_checkpoint

    folder = make_tiny_checkpoint(tmp_path / "bin", file_format=file_format, num_shards=num_shards, tokenizer_dir=tiny_tokenizer)
    loads = collections.Counter()
    real_load = torch.load

    def counting_load(f, *args, **kwargs):
        loads[Path(f).name] += 1
        return real_load(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", counting_load)
    load_model(folder, device="cpu", dtype="float32", max_context=64)
    files = [p.name for p in find_weight_files(folder).files]
    assert len(files) == num_shards and loads == {name: 2 for name in files}
    # the checks that read those names and shapes still refuse: the 4-bit one…
    raw = config_of(folder)
    raw["llm_config"]["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": 32}
    (folder / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError) as err:
        load_model(folder, device="cpu", dtype="float32", max_context=64)
    one_line(err, "declares 4-bit AWQ weights", "no .qweight tensors")
    # …and the embeddings one
    raw["llm_config"].pop("quantization_config")
    raw["llm_config"]["vocab_size"] += 64
    (folder / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError) as err:
        load_model(folder, device="cpu", dtype="float32", max_context=64)
    one_line(err, EMBED, "config.json and the weights disagree")


def _refused_unparsed(path: Path, monkeypatch, *words: str) -> None:
    from internvl_chat.engine.tensor_reader import pickle_shapes

    def no_load(*args, **kwargs):
        raise AssertionError("torch.load parsed a pickle that should have been refused first")

    monkeypatch.setattr(torch, "load", no_load)
    with pytest.raises(CheckpointError) as err:
        pickle_shapes(path)
    one_line(err, str(path), "16,384 tensors", "4 MiB", "not a weights file", *words)


@pytest.mark.parametrize("legacy", [False, True])
def test_a_pickle_of_a_huge_list_of_tensors_is_refused_before_it_is_parsed(tmp_path, monkeypatch, legacy):
    """A safetensors header is bounded (16 MiB); a pickle's list of tensors was not: 200,000
    one-element tensors took 21 s to load memory-mapped (and the checks loaded each file three
    times). Views of one storage take ~18 bytes each of the pickle; 250,000 of them are refused by
    the pickle's size, zip or legacy, before torch parses it."""
    base = torch.zeros(1)
    path = tmp_path / "pytorch_model.bin"
    torch.save({f"w{i}": base for i in range(250_000)}, path, _use_new_zipfile_serialization=not legacy)
    _refused_unparsed(path, monkeypatch, "MiB of tensor names and shapes")


def test_a_pickle_of_too_many_storages_is_refused_before_it_is_parsed(tmp_path, monkeypatch):
    path = tmp_path / "pytorch_model.bin"
    torch.save({f"w{i}": torch.zeros(1) for i in range(17_000)}, path)
    _refused_unparsed(path, monkeypatch, "is a zip of 17,0")


def test_a_pickle_of_too_many_views_is_refused_by_count(tmp_path):
    """Under the size cap (18 bytes a view), the count itself is capped after the load."""
    from internvl_chat.engine.tensor_reader import pickle_shapes

    base = torch.zeros(1)
    path = tmp_path / "pytorch_model.bin"
    torch.save({f"w{i}": base for i in range(20_000)}, path)
    with pytest.raises(CheckpointError) as err:
        pickle_shapes(path)
    one_line(err, str(path), "holds 20,000 tensors", "16,384 tensors")


@pytest.mark.parametrize("name", [
    "\x1b]0;owned\x07" + "x" * 5000 + ".qkv_proj.bias",  # any name holding .qkv_proj. and ending .bias is split
    "language_model.model.layers." + "9" * 5000 + ".self_attn.qkv_proj.scales",  # a linear left without its qweight
])  # fmt: skip
def test_a_tinychat_name_in_an_error_is_escaped_and_cut_short(tiny_original, name):
    """Names from a TinyChat file went into its errors raw: a terminal title escape, and a line as
    long as the name (a pickle's names are up to its 4 MiB)."""
    import dataclasses

    from internvl_chat.engine.config import QuantConfig
    from internvl_chat.engine.tinychat import convert_tinychat

    cfg = dataclasses.replace(load_config(tiny_original), quant=QuantConfig(group_size=64))
    with pytest.raises(CheckpointError) as err:
        list(convert_tinychat([(name, torch.zeros(3))], cfg))
    text = one_line(err)
    assert len(text) < 300 and "\x07" not in text and "…" in text, text


def test_the_weights_loaded_are_the_files_that_were_checked(tiny_tokenizer, tmp_path, monkeypatch):
    """The loader found the weight files, checked them (sizes, embeddings, 4-bit), then looked for
    them again to load: a model.safetensors written beside the checked .bin files meanwhile (a
    download into the folder, say) was loaded in their place, unchecked. The files checked load."""
    import internvl_chat.engine.loader as loader
    from make_tiny_checkpoint import make_tiny_checkpoint

    folder = make_tiny_checkpoint(tmp_path / "bin", file_format="bin", tokenizer_dir=tiny_tokenizer)
    real = loader.stored_embeddings

    def checked_then_changed(*args, **kwargs):
        found = real(*args, **kwargs)
        (folder / "model.safetensors").write_bytes(b"\x08" + b"\0" * 7 + b"{}")  # not what was checked
        return found

    monkeypatch.setattr(loader, "stored_embeddings", checked_then_changed)
    loaded = load_model(folder, device="cpu", dtype="float32", max_context=64)
    assert (folder / "model.safetensors").is_file() and loaded.model is not None


@pytest.mark.parametrize("key", ["rope_parameters", "rope_scaling"])
def test_rope_parameters_per_layer_type_are_refused(tiny_original, key):
    """transformers 5's per-layer-type form ({"full_attention": {...}}) was read as a flat one:
    no rope_type there meant "default", and its linear scaling and θ went unseen (Qwen2's rotary
    embedding in transformers fails on it)."""
    raw = edited(config_of(tiny_original), f"llm_config.{key}",
                 {"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 3.0}})  # fmt: skip
    with pytest.raises(CheckpointError) as err:
        parse_config(raw, "/models/x/config.json")
    one_line(err, "/models/x/config.json", f"llm_config.{key}", "'full_attention'", "per layer type")


@pytest.mark.parametrize("key", ["llm_config.hidden_size", "junk"])
def test_a_config_value_nested_nearly_as_deep_as_the_parser_allows_is_one_line(tiny_original, tmp_path, key):
    """The JSON parser takes what the stack left allows (~990 levels near its top). Such a value was
    read, then written out again deeper in the stack: quoted in an error (json.dumps raised
    RecursionError, a traceback), or, kept in an unused key, by quantize writing the config. A
    checkpoint's JSON nests a few levels: more than 64 is refused as it is read. Every depth up to
    what the parser takes here is tried, so the one just under its limit is among them."""
    from internvl_chat.quantize.writer import original_config

    folder = tmp_path / "m"
    shutil.copytree(tiny_original, folder)
    template = json.dumps(edited(config_of(folder), key, "NESTED"))
    for depth in range(1000, 800, -1):
        (folder / "config.json").write_text(template.replace('"NESTED"', "[" * depth + "]" * depth))
        with pytest.raises(CheckpointError) as err:
            original_config(folder, load_config(folder), 32)
        one_line(err, str(folder / "config.json"), "nested too deeply")


def test_a_config_nested_as_checkpoints_nest_still_loads(tiny_original, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(tiny_original, folder)
    nested: object = 1
    for _ in range(60):
        nested = {"a": nested}
    (folder / "config.json").write_text(json.dumps(edited(config_of(folder), "junk", nested)))
    assert load_config(folder).text.hidden_size == 64


def test_a_zip64_pickle_of_too_many_entries_is_refused_before_it_is_parsed(tmp_path, monkeypatch):
    """Over 65,535 entries a zip keeps its counts in zip64 records: read there too."""
    import zipfile

    path = tmp_path / "pytorch_model.bin"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", b"\x80\x02}q\x00.")
        for i in range(70_000):
            z.writestr(f"archive/data/{i}", b"")
    _refused_unparsed(path, monkeypatch, "is a zip of 70,001 entries")


@pytest.mark.parametrize("straddling", [b"r", b"J", b"M", b"c"])
def test_a_legacy_pickle_whose_4_mib_end_inside_an_argument_is_refused_before_it_is_parsed(tmp_path, monkeypatch, straddling):
    """The legacy walk refused a pickle that ran past 4 MiB only where pickletools' message said
    "exhausted" or "remain": one whose 4 MiB ended inside a 4- or 2-byte argument ("not enough
    data in stream to read uint4") or a GLOBAL's name ("no newline found") passed, and torch parsed
    it whole (a sys_info string of the right length puts any pickle there)."""
    from internvl_chat.engine.tensor_reader import MAX_PICKLE_BYTES

    body = b"\x80\x02" + b"N0" * ((MAX_PICKLE_BYTES - 3) // 2)
    body += b"N" * (MAX_PICKLE_BYTES - 1 - len(body))  # the next opcode is the file's 4 MiB-th byte
    path = tmp_path / "pytorch_model.bin"
    path.write_bytes(body + straddling + b"\0\0\0\0builtins\nint\n0." + b"\x80\x02N." * 4 + b"\0" * 64)
    _refused_unparsed(path, monkeypatch, "MiB of tensor names and shapes")


def test_a_zip_of_exactly_65535_entries_is_refused_before_it_is_parsed(tmp_path, monkeypatch):
    """A zip of 65,535 entries writes that count as 0xFFFF with no zip64 records (Python's zipfile
    adds them only above it): the check took 0xFFFF for "see the zip64 records", found none and
    checked nothing, entries nor data.pkl's size, and torch loaded it (as it does: 250,000 views
    of one storage in such a zip took seconds)."""
    import zipfile

    path = tmp_path / "pytorch_model.bin"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", b"\x80\x02}q\x00.")
        for i in range(65_534):
            z.writestr(f"archive/data/{i}", b"")
    assert struct.unpack_from("<H", path.read_bytes(), path.stat().st_size - 12)[0] == 0xFFFF
    _refused_unparsed(path, monkeypatch, "is a zip of 65,535 entries")


@pytest.mark.parametrize("past_the_file", ["zip64 record", "directory"])
def test_a_zip64_offset_past_the_file_is_one_line(tmp_path, past_the_file):
    """The zip64 records' offsets are 64-bit: one of 2**63 or more made the size check's seek raise
    OverflowError, a traceback, where torch says the file is damaged."""
    from internvl_chat.engine.tensor_reader import pickle_shapes

    body = b"PK\x03\x04" + b"\0" * 100
    directory = 2**64 - 1 if past_the_file == "directory" else 0
    end64 = b"PK\x06\x06" + struct.pack("<QHHIIQQQQ", 44, 45, 45, 0, 0, 1, 1, 46, directory)
    record = 2**64 - 1 if past_the_file == "zip64 record" else len(body)
    locator = b"PK\x06\x07" + struct.pack("<IQI", 0, record, 1)
    end = b"PK\x05\x06" + struct.pack("<HHHHIIH", 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0)
    path = tmp_path / "pytorch_model.bin"
    path.write_bytes(body + end64 + locator + end)
    with pytest.raises(CheckpointError) as err:
        pickle_shapes(path)
    one_line(err, str(path), "damaged")


def test_a_zip_directory_over_4_mib_is_named_as_such(tmp_path, monkeypatch):
    """A zip of few entries whose directory is over 4 MiB (long names, or a size field of 0xFFFFFFFF)
    was refused as "a zip of 2 entries, over the 16,384 tensors…": a reason that is none."""
    import zipfile

    path = tmp_path / "pytorch_model.bin"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", b"\x80\x02}q\x00.")
        z.writestr(zipfile.ZipInfo("archive/data/0", date_time=(2020, 1, 1, 0, 0, 0)), b"")
    data = bytearray(path.read_bytes())
    struct.pack_into("<I", data, len(data) - 10, 5 << 20)  # the end record's directory size
    path.write_bytes(bytes(data))
    _refused_unparsed(path, monkeypatch, "has a zip directory of 5.0 MiB")


@pytest.mark.parametrize("record", ["DATA.PKL", "byteorder", ".data/version"])
def test_a_large_record_torch_reads_whole_is_refused_whatever_its_case(tmp_path, monkeypatch, record):
    """torch finds a zip's records ignoring case (miniz's lookup): an "archive/DATA.PKL" of 250,000
    views (4.4 MiB) passed the data.pkl size check and torch parsed it. The other records torch
    reads whole (version, byteorder) were not bounded at all; only the storages, memory-mapped,
    are ever over 4 MiB."""
    import io
    import zipfile

    path = tmp_path / "pytorch_model.bin"
    if record == "DATA.PKL":
        buf = io.BytesIO()
        base = torch.zeros(1)
        torch.save({f"w{i}": base for i in range(250_000)}, buf)
        source = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
        with zipfile.ZipFile(path, "w") as z:
            for name in source.namelist():
                z.writestr(name.replace("data.pkl", record), source.read(name))
        words = ("pickles 4.", "MiB of tensor names and shapes")
    else:
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("archive/data.pkl", b"\x80\x02}q\x00.")
            z.writestr(f"archive/{record}", b"1" * (5 << 20))
            z.writestr("archive/data/0", b"\0" * (5 << 20))  # a storage that large is fine
        words = (f"has a record archive/{record} of 5.0 MiB that is no tensor's data",)
    _refused_unparsed(path, monkeypatch, *words)


def test_a_zip_pickle_with_large_storages_passes_the_size_check(tmp_path):
    from internvl_chat.engine.tensor_reader import pickle_shapes

    path = tmp_path / "pytorch_model.bin"
    torch.save({"a": torch.zeros(3 << 20), "b": torch.zeros(5)}, path)  # a 12 MiB storage
    assert pickle_shapes(path) == [("a", torch.float32, (3 << 20,)), ("b", torch.float32, (5,))]


def test_a_zip_whose_32_bit_end_record_is_a_decoy_is_checked_by_its_zip64_one(tmp_path, monkeypatch):
    """torch writes a zip64 locator and record in every file, and its reader takes their values
    whatever the 32-bit end record says. The check read the zip64 ones only where the 32-bit ones
    were 0xFFFF…: a 32-bit record edited to say one entry and an empty directory hid a data.pkl of
    250,000 views (4.4 MiB) that torch then parsed."""
    base = torch.zeros(1)
    path = tmp_path / "pytorch_model.bin"
    torch.save({f"w{i}": base for i in range(250_000)}, path)
    data = bytearray(path.read_bytes())
    at = data.rfind(b"PK\x05\x06")
    assert data[at - 20 : at - 16] == b"PK\x06\x07"  # torch's zip64 locator
    struct.pack_into("<HHII", data, at + 8, 1, 1, 0, 0)  # 1 entry, a directory of 0 bytes at 0
    path.write_bytes(bytes(data))
    _refused_unparsed(path, monkeypatch, "pickles 4.", "MiB of tensor names and shapes")
