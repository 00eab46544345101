"""A deterministic mutation fuzz of the checkpoint files (config.json, preprocessor_config.json,
tokenizer.json, tokenizer_config.json, the safetensors header): each mutant of the tiny checkpoint
either loads (and builds a prompt) or is one CheckpointError/UsageError line, never another
exception (tests/fuzz_helpers.py says how mutants are made).

The tiny model loads in ~40 ms, so every mutant goes through the whole of load_model.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path
from types import SimpleNamespace

import pytest
from fuzz_helpers import Findings, byte_mutants, json_boundaries, json_text, spread, tree_mutants

from internvl_chat.chat.template import MediaSpec, PromptBuilder
from internvl_chat.engine.loader import check_tokenizer_fits_vocab, load_model
from internvl_chat.engine.tokenizer import load_tokenizer, special_token_ids


def _load_and_prompt(folder: Path) -> None:
    loaded = load_model(folder, device="cpu", dtype="float32", max_context=256, compile="off")
    builder = PromptBuilder(loaded.tokenizer, loaded.config.system_message, loaded.config.tokens_per_tile)
    ids = builder.first_turn("Hi <|im_end|> naïve", [MediaSpec("image", 1)])
    loaded.tokenizer.decode(ids)


def _copy(source: Path, folder: Path) -> Path:
    if folder.exists():
        shutil.rmtree(folder)
    shutil.copytree(source, folder)
    return folder


def _fuzz_json_file(source: Path, folder: Path, name: str, tree_count: int, byte_count: int, seed: int, capfd,
                    use=_load_and_prompt) -> Findings:  # fmt: skip
    """Mutants of the JSON file `name` in a copy of the checkpoint `source`, each given to `use`."""
    folder = _copy(source, folder)
    good = (source / name).read_bytes()
    findings = Findings(f"{source.name}/{name}", capfd)
    path = folder / name
    mutants = list(tree_mutants(json.loads(good), seed, tree_count))
    mutants += list(byte_mutants(good, seed, byte_count, json_boundaries(good)[:: max(len(good) // 400, 1)][:40]))
    for label, mutant in mutants:
        path.write_bytes(mutant if isinstance(mutant, bytes) else json_text(mutant).encode("utf-8", "surrogatepass"))
        findings.check(label, lambda: use(folder))
    return findings


@pytest.mark.parametrize("fixture", ["tiny_original", "tiny_hf"])
def test_config_json_mutants(request, tmp_path, fixture, capfd):
    source = request.getfixturevalue(fixture)
    _fuzz_json_file(source, tmp_path / "model", "config.json", 50, 15, seed=11, capfd=capfd).assert_none()


def test_preprocessor_config_mutants(tiny_hf, tmp_path, capfd):
    source = _copy(tiny_hf, tmp_path / "with_preprocessor")
    (source / "preprocessor_config.json").write_text(json.dumps({"max_patches": 6, "min_patches": 1, "crop_to_patches": True}))
    _load_and_prompt(source)
    _fuzz_json_file(source, tmp_path / "model", "preprocessor_config.json", 40, 10, seed=12, capfd=capfd).assert_none()


def test_tokenizer_json_mutants(tiny_original, tmp_path, capfd):
    _fuzz_json_file(tiny_original, tmp_path / "model", "tokenizer.json", 100, 40, seed=13, capfd=capfd).assert_none()


def test_tokenizer_config_mutants(tiny_original, tmp_path, capfd):
    _fuzz_json_file(tiny_original, tmp_path / "model", "tokenizer_config.json", 60, 20, seed=14, capfd=capfd).assert_none()


def test_safetensors_header_mutants(tiny_original, tmp_path, capfd):
    """Mutations inside the 8-byte length and the JSON header (the tensors' bytes are data: any
    value loads), and header fields edited as JSON."""
    folder = _copy(tiny_original, tmp_path / "model")
    good = (tiny_original / "model.safetensors").read_bytes()
    header_end = 8 + struct.unpack("<Q", good[:8])[0]
    header, data = good[:header_end], good[header_end:]
    findings = Findings("model.safetensors", capfd)
    path = folder / "model.safetensors"
    for label, mutant in byte_mutants(header, 15, 80, [0, 4, 7, 8, header_end - 1]):
        path.write_bytes(mutant + data)
        findings.check(label, lambda: _load_and_prompt(folder))
    for label, tree in tree_mutants(json.loads(header[8:]), 15, 80):
        text = json_text(tree).encode("utf-8", "surrogatepass")
        path.write_bytes(struct.pack("<Q", len(text)) + text + data)
        findings.check(label, lambda: _load_and_prompt(folder))
    findings.assert_none()


def _tokenize(folder: Path, vocab_size: int = 512) -> None:
    """What load_model does with a tokenizer alone (`vocab_size`: its config.json's; the weights do
    not come into it)."""
    tokenizer = load_tokenizer(folder, vocab_size)
    special_token_ids(tokenizer)
    check_tokenizer_fits_vocab(tokenizer, SimpleNamespace(text=SimpleNamespace(vocab_size=vocab_size)), folder)
    ids = PromptBuilder(tokenizer, "Be brief.").first_turn("Hi <|im_end|> naïve", [MediaSpec("image", 1)])
    tokenizer.decode(ids)


@pytest.mark.parametrize("name", ["vocab.json", "merges.txt", "tokenizer_config.json"])
def test_slow_tokenizer_file_mutants(tmp_path, capfd, name):
    """The fallback for a checkpoint without tokenizer.json: vocab.json + merges.txt, read by transformers."""
    from test_tokenizer import _write_qwen2_style

    source = _write_qwen2_style(tmp_path / "slow", with_tokenizer_json=False)
    _tokenize(source)
    folder = _copy(source, tmp_path / "model")
    good = (source / name).read_bytes()
    findings = Findings(f"slow tokenizer {name}", capfd)
    mutants = list(byte_mutants(good, 16, 30, spread(json_boundaries(good) if name != "merges.txt" else every_line(good), 20)))
    if name != "merges.txt":
        mutants += list(tree_mutants(json.loads(good), 16, 40))
    for label, mutant in mutants:
        (folder / name).write_bytes(mutant if isinstance(mutant, bytes) else json_text(mutant).encode("utf-8", "surrogatepass"))
        findings.check(label, lambda: _tokenize(folder))
    findings.assert_none()


def every_line(data: bytes) -> list[int]:
    return [i + 1 for i, byte in enumerate(data) if byte == 0x0A]


@pytest.fixture(scope="module")
def tiny_sharded(tmp_path_factory, tiny_tokenizer) -> Path:
    from make_tiny_checkpoint import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("fuzz_sharded"), file_format="sharded", tokenizer_dir=tiny_tokenizer)


@pytest.fixture(scope="module")
def tiny_bin(tmp_path_factory, tiny_tokenizer) -> Path:
    from make_tiny_checkpoint import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("fuzz_bin"), file_format="bin", tokenizer_dir=tiny_tokenizer)


def test_shard_index_mutants(tiny_sharded, tmp_path, capfd):
    _fuzz_json_file(tiny_sharded, tmp_path / "model", "model.safetensors.index.json", 60, 20, seed=17, capfd=capfd).assert_none()


def test_pickle_weight_file_mutants(tiny_bin, tmp_path, capfd):
    """pytorch_model.bin: a zip of a pickle and the tensors' bytes; the zip's own headers, the
    pickle and the tensor records are what a mutant reaches (the data bytes would load as any value)."""
    folder = _copy(tiny_bin, tmp_path / "model")
    name = next(p.name for p in tiny_bin.glob("*.bin"))
    good = (tiny_bin / name).read_bytes()
    pickle_at = good.index(b"data.pkl") + 8
    directory_at = good.rindex(b"PK\x01\x02", 0, good.rindex(b"PK\x05\x06"))  # the zip's central directory, on
    findings = Findings(name, capfd)
    mutants = [*byte_mutants(good, 18, 40, span=(0, pickle_at + 4096)), *byte_mutants(good, 19, 40, span=(directory_at - 2048, len(good)))]
    for label, data in mutants:
        (folder / name).write_bytes(data)
        findings.check(label, lambda: _load_and_prompt(folder))
    findings.assert_none()


@pytest.fixture(scope="module")
def tiny_awq(tiny_original, tmp_path_factory) -> Path:
    from internvl_chat.quantize import quantize_checkpoint

    return quantize_checkpoint(tiny_original, tmp_path_factory.mktemp("fuzz_awq") / "w4", "rtn", group_size=32, device="cpu")


def test_awq_config_mutants(tiny_awq, tmp_path, capfd):
    """config.json's quantization_config and the int4 tensors' header entries of a 4-bit checkpoint."""
    _fuzz_json_file(tiny_awq, tmp_path / "model", "config.json", 60, 0, seed=20, capfd=capfd).assert_none()


def test_quantize_source_config_mutants(tiny_original, tmp_path, capfd):
    """`internvl-chat quantize` reads an untrusted checkpoint too (its other files are copied as bytes)."""
    from internvl_chat.quantize import quantize_checkpoint

    def quantize(folder: Path) -> None:
        out = tmp_path / "out"
        if out.exists():
            shutil.rmtree(out)
        quantize_checkpoint(folder, out, "rtn", group_size=32, device="cpu")

    _fuzz_json_file(tiny_original, tmp_path / "model", "config.json", 30, 10, seed=21, capfd=capfd, use=quantize).assert_none()
