"""The quantizer (RTN and AWQ) and loading 4-bit checkpoints: published AWQ layout and TinyChat v2."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from internvl_chat.chat.template import PromptBuilder
from internvl_chat.engine.loader import load_model
from internvl_chat.errors import CheckpointError
from internvl_chat.quant.awq_format import awq_to_tinychat_v2, dequantize_awq, quantize_rtn
from internvl_chat.quantize import (
    calibration_samples,
    fake_quantize,
    float_tensors,
    group_grams,
    linear_error,
    original_config,
    quantize_checkpoint,
    quantize_model,
    search_clip,
    write_checkpoint,
)

GROUP = 32  # divides the tiny model's widths (64, 128)
PROMPT = list(range(20, 220))


def _logits(folder: Path, **kw) -> torch.Tensor:
    return load_model(folder, device="cpu", dtype="float32", max_context=1024, **kw).model.forward(PROMPT, 0, all_logits=True)


def _stats(ref: torch.Tensor, got: torch.Tensor) -> tuple[float, float]:
    cos = torch.nn.functional.cosine_similarity(ref, got, dim=-1).mean().item()
    kl = torch.nn.functional.kl_div(got.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="batchmean").item()
    return cos, kl


@pytest.fixture(scope="module")
def quantized(tiny_original, tmp_path_factory) -> dict[str, Path]:
    out = {}
    for method in ("rtn", "awq"):
        dst = tmp_path_factory.mktemp(f"q_{method}") / "model"
        quantize_checkpoint(tiny_original, dst, method, group_size=GROUP, samples=6, device="cpu")
        out[method] = dst
    return out


def test_quantized_logits_stay_close_to_float(tiny_original, quantized, capsys):
    ref = _logits(tiny_original)
    for method, folder in quantized.items():
        cos, kl = _stats(ref, _logits(folder))
        with capsys.disabled():
            print(f"\n  {method}: cosine {cos:.4f}, KL {kl:.4f}")
        assert cos > 0.8 and kl < 0.5, (method, cos, kl)


def _with_outlier_channels(src: Path, dst: Path) -> Path:
    """A model whose norms give a few input channels 30× the magnitude of the rest (as real LLMs have)."""
    shutil.copytree(src, dst)
    [weights] = dst.glob("*.safetensors")
    tensors = load_file(weights)
    gen = torch.Generator().manual_seed(0)
    for name, t in tensors.items():
        if name.endswith(("input_layernorm.weight", "post_attention_layernorm.weight")):
            channels = torch.randperm(t.shape[0], generator=gen)[:3]
            t[channels] *= 30
    save_file(tensors, weights, metadata={"format": "pt"})
    return dst


def test_awq_beats_rtn_on_outlier_channels(tiny_original, tmp_path):
    model = _with_outlier_channels(tiny_original, tmp_path / "outliers")
    ref = _logits(model)
    errors = {}
    for method in ("rtn", "awq"):
        dst = tmp_path / method
        quantize_checkpoint(model, dst, method, group_size=GROUP, samples=8, device="cpu")
        errors[method] = (_logits(dst) - ref).pow(2).mean().item()
    assert errors["awq"] < 0.7 * errors["rtn"], errors


def test_search_round_trip_is_the_written_quantizer():
    """The searches optimise exactly the weights that are written: fake_quantize (no packing) equals
    quantize_rtn → dequantize_awq, with and without clip ranges."""
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(48, 128, generator=gen) * 0.05  # [N, K] (nn.Linear layout)
    groups = w.view(48, -1, GROUP)
    clip = (groups.amax(-1) * 0.8, groups.amin(-1) * 0.7)  # [N, G]
    for c in (None, clip):
        clip_max, clip_min = (None, None) if c is None else (c[0].t(), c[1].t())
        written = dequantize_awq(*quantize_rtn(w.t(), GROUP, clip_max, clip_min), GROUP, dtype=torch.float32).t()
        assert torch.equal(fake_quantize(w, GROUP, c), written)


def test_gram_errors_equal_errors_over_the_rows():
    """The output error through XᵀX (scale search on a linear, clip search per group) is the error
    measured row by row, so using all rows this way changes nothing but the cost."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(300, 64, generator=gen) * torch.linspace(0.1, 3.0, 64)  # uneven channels, as real inputs
    reference = torch.randn(40, 64, generator=gen)
    linear = torch.nn.Linear(64, 40, bias=False)
    linear.weight.data = reference + 0.01 * torch.randn(40, 64, generator=gen)
    direct = (x @ (linear.weight - reference).t()).pow(2).mean()
    for calls in (20, 1):  # through XᵀX (cheaper for 20 calls here), row by row (cheaper for one)
        assert torch.allclose(linear_error(x, reference, linear, calls)(), direct, rtol=1e-4)

    best_max, best_min = search_clip(reference, group_grams(x, GROUP), GROUP)
    xg = x.view(300, -1, GROUP)

    def errors(c_max, c_min):  # [N, G] over the rows, as the search was done before
        d = fake_quantize(reference, GROUP, (c_max, c_min)).view(40, -1, GROUP) - reference.view(40, -1, GROUP)
        return torch.einsum("rgk,ngk->rng", xg, d).pow(2).mean(dim=0)

    w = reference.view(40, -1, GROUP)
    brute = torch.stack([errors(w.amax(-1) * (1 - s / 20), w.amin(-1) * (1 - s / 20)) for s in range(10)]).amin(dim=0)
    got = errors(best_max, best_min)
    assert torch.all(got <= brute * (1 + 1e-4) + 1e-12)
    assert torch.all(got <= errors(w.amax(-1), w.amin(-1)))  # never worse than no clipping


def test_save_then_load_equals_the_in_memory_quantized_model(tiny_original, tmp_path):
    loaded = load_model(tiny_original, device="cpu", dtype="float32", max_context=1024)
    builder = PromptBuilder(loaded.tokenizer, loaded.config.system_message)
    packed = quantize_model(loaded, calibration_samples(builder, loaded.tokenizer, 4), "awq", GROUP)
    in_memory = loaded.model.forward(PROMPT, 0, all_logits=True)  # weights are their 4-bit round trip
    write_checkpoint(tmp_path / "q", original_config(tiny_original, loaded.config, GROUP), {**float_tensors(loaded), **packed}, tiny_original)
    # norms and biases are stored in fp16, as published: allow fp16 rounding, nothing more
    got = _logits(tmp_path / "q", int4_backend="dequant")
    assert (got - in_memory).abs().max().item() <= 5e-3 * in_memory.abs().max().item()
    # PyTorch's CPU int4 kernel takes bf16 activations: close, not bit-exact
    cos, _ = _stats(in_memory, _logits(tmp_path / "q", int4_backend="torch"))
    assert cos > 0.999, cos


def test_saved_checkpoint_matches_the_published_layout(tiny_original, quantized):
    folder = quantized["awq"]
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["InternVLChatModel"]
    assert config["llm_config"]["quantization_config"] == {
        "quant_method": "awq", "version": "gemm", "bits": 4, "group_size": GROUP, "zero_point": True,
    }  # fmt: skip
    assert "quantization_config" not in config
    source = load_file(next(tiny_original.glob("*.safetensors")))
    saved = load_file(folder / "model.safetensors")
    linears = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    expected = set()
    for name in source:
        is_linear = name.startswith("language_model.model.layers.") and any(f".{l}.weight" in name for l in linears)
        if is_linear:
            stem = name.removesuffix(".weight")
            expected |= {f"{stem}.qweight", f"{stem}.qzeros", f"{stem}.scales"}
        else:
            expected.add(name)
    assert set(saved) == expected
    for name, tensor in saved.items():
        stem, suffix = name.rsplit(".", 1)
        if suffix in ("qweight", "qzeros", "scales"):
            n, k = source[f"{stem}.weight"].shape
        if name.endswith(".qweight"):
            assert tensor.dtype == torch.int32 and tuple(tensor.shape) == (k, n // 8), name
        elif name.endswith(".qzeros"):
            assert tensor.dtype == torch.int32 and tuple(tensor.shape) == (k // GROUP, n // 8), name
        elif name.endswith(".scales"):
            assert tensor.dtype == torch.float16 and tuple(tensor.shape) == (k // GROUP, n), name
        else:
            assert tensor.dtype == torch.float16 and tensor.shape == source[name].shape, name
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (folder / name).is_file()


def test_an_hf_source_is_written_as_the_original_layout_other_tools_read(tiny_hf, tmp_path):
    """The output of an -hf source carries its llm_config over from text_config. transformers ≥ 5
    keeps rope_theta only under rope_parameters, where the original layout's readers (InternVL's own
    code, lmdeploy, transformers 4) do not look: they would run the output with a θ of 10,000."""
    source = json.loads((tiny_hf / "config.json").read_text())
    text = source["text_config"]
    assert "rope_theta" not in text and text["rope_parameters"]["rope_theta"] == 1e6  # as transformers 5 saves it
    text["dtype"] = "bfloat16"  # and where it names the dtype so, under text_config too
    src = tmp_path / "src"
    shutil.copytree(tiny_hf, src)
    (src / "config.json").write_text(json.dumps(source))
    quantize_checkpoint(src, tmp_path / "out", "rtn", group_size=GROUP, device="cpu")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    llm = config["llm_config"]
    assert config["architectures"] == ["InternVLChatModel"] and llm["model_type"] == "qwen2"
    assert llm["rope_theta"] == 1e6
    assert llm["quantization_config"] == {"quant_method": "awq", "version": "gemm", "bits": 4, "group_size": GROUP, "zero_point": True}
    assert llm["torch_dtype"] == llm["dtype"] == config["torch_dtype"] == "float16"
    assert "dtype" not in config or config["dtype"] == "float16"


@pytest.mark.parametrize("empty", [{}, None])
def test_an_empty_top_level_quantization_config_of_the_source_is_not_carried_over(tiny_original, tmp_path, empty):
    """The published layout keeps quantization_config under llm_config only; an empty (or null) one
    the source had at the top was copied along, where tools that look there first read it."""
    src = tmp_path / "src"
    shutil.copytree(tiny_original, src)
    raw = json.loads((src / "config.json").read_text())
    raw["quantization_config"] = empty
    (src / "config.json").write_text(json.dumps(raw))
    quantize_checkpoint(src, tmp_path / "out", "rtn", group_size=GROUP, device="cpu")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "quantization_config" not in config and config["llm_config"]["quantization_config"]["quant_method"] == "awq"


def _edit_config(folder: Path, edit) -> None:
    raw = json.loads((folder / "config.json").read_text())
    edit(raw["llm_config"]["quantization_config"])
    (folder / "config.json").write_text(json.dumps(raw))


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda q: q.update(bits=8), "AWQ with 8 bits is not supported"),
        (lambda q: q.update(version="gemv"), "AWQ version 'gemv' is not supported"),
        (lambda q: q.update(group_size=64), "config.json and the weights disagree|shape"),
    ],
)
def test_unsupported_awq_configs_are_refused(quantized, tmp_path, edit, message):
    folder = tmp_path / "m"
    shutil.copytree(quantized["rtn"], folder)
    _edit_config(folder, edit)
    with pytest.raises(CheckpointError, match=message):
        load_model(folder, device="cpu", dtype="float32", max_context=256)


def test_4_bit_weights_under_a_16_bit_config_are_named(quantized, tiny_original, tmp_path):
    """The 16-bit model's config.json copied over an AWQ download was refused only once the model was
    built, as "42 unexpected tensor(s) … (wrong layout or a different model)"."""
    folder = tmp_path / "m"
    shutil.copytree(quantized["rtn"], folder)
    shutil.copy(tiny_original / "config.json", folder / "config.json")
    with pytest.raises(CheckpointError) as err:
        load_model(folder, device="cpu", dtype="float32", max_context=256)
    assert str(err.value) == (
        f"{folder / 'model.safetensors'} holds 4-bit AWQ weights (language_model.model.layers.0.mlp.down_proj.qweight) but "
        f"config.json of {folder} has no quantization_config; use the config.json shipped with these weights"
    )


def test_16_bit_weights_under_an_awq_config_are_named(quantized, tiny_original, tmp_path):
    """The AWQ model's config.json copied over a 16-bit download: loading refused it as "14 unexpected
    tensor(s)" once the model was built, and quantize called the 16-bit source "already quantized"."""
    from internvl_chat.errors import UsageError

    folder = tmp_path / "m"
    shutil.copytree(tiny_original, folder)
    shutil.copy(quantized["rtn"] / "config.json", folder / "config.json")
    expected = (f"config.json of {folder} declares 4-bit AWQ weights (quantization_config) but its weight files hold 16-bit "
                "ones (no .qweight tensors); use the config.json shipped with these weights")  # fmt: skip
    with pytest.raises(CheckpointError) as err:
        load_model(folder, device="cpu", dtype="float32", max_context=256)
    assert str(err.value) == expected
    with pytest.raises((CheckpointError, UsageError)) as err:
        quantize_checkpoint(folder, tmp_path / "out", "rtn", device="cpu")
    assert str(err.value) == expected and not (tmp_path / "out").exists()
    # the AWQ checkpoint itself is still "already quantized"
    with pytest.raises(UsageError, match="already quantized"):
        quantize_checkpoint(quantized["rtn"], tmp_path / "out", "rtn", device="cpu")


def _as_pickles(folder: Path, sharded: bool) -> Path:
    """The folder's model.safetensors as PyTorch pickles: the published AWQ layout's two shards and
    index (SPEC §2), or one pytorch_model.bin."""
    tensors = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    if not sharded:
        torch.save(tensors, folder / "pytorch_model.bin")
        return folder
    names = sorted(tensors)
    shards = {"pytorch_model-00001-of-00002.bin": names[::2], "pytorch_model-00002-of-00002.bin": names[1::2]}
    for file, part in shards.items():
        torch.save({n: tensors[n] for n in part}, folder / file)
    weight_map = {n: file for file, part in shards.items() for n in part}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return folder


@pytest.mark.parametrize("sharded", [True, False], ids=["shards", "single"])
def test_a_config_that_disagrees_with_pickled_weights_on_4_bit_is_named(quantized, tiny_original, tmp_path, sharded):
    """The published AWQ checkpoints are pickles, whose tensors no safetensors header declares: both
    checks above were skipped for them, so a 16-bit config.json over 4-bit pickles built the whole
    16-bit model first (out of memory for a large one, with the advice to use a 4-bit checkpoint)
    and then refused it as "42 unexpected tensors"; the reverse as "14 unexpected tensors", and
    quantize called such a 16-bit source "already quantized"."""
    from internvl_chat.errors import UsageError

    four_bit = _as_pickles(shutil.copytree(quantized["rtn"], tmp_path / "w4"), sharded)
    shutil.copy(tiny_original / "config.json", four_bit / "config.json")
    with pytest.raises(CheckpointError) as err:
        load_model(four_bit, device="cpu", dtype="float32", max_context=256)
    assert "holds 4-bit AWQ weights (language_model.model.layers.0." in str(err.value)
    assert "has no quantization_config; use the config.json shipped with these weights" in str(err.value)

    sixteen_bit = _as_pickles(shutil.copytree(tiny_original, tmp_path / "w16"), sharded)
    shutil.copy(quantized["rtn"] / "config.json", sixteen_bit / "config.json")
    expected = (f"config.json of {sixteen_bit} declares 4-bit AWQ weights (quantization_config) but its weight files hold "
                "16-bit ones (no .qweight tensors); use the config.json shipped with these weights")  # fmt: skip
    with pytest.raises(CheckpointError) as err:
        load_model(sixteen_bit, device="cpu", dtype="float32", max_context=256)
    assert str(err.value) == expected
    with pytest.raises((CheckpointError, UsageError)) as err:
        quantize_checkpoint(sixteen_bit, tmp_path / "out", "rtn", device="cpu")
    assert str(err.value) == expected and not (tmp_path / "out").exists()


def _index_edited(folder: Path, drop: tuple[str, ...] = (), add: dict[str, str] | None = None) -> None:
    """The folder's pytorch_model.bin.index.json with names ending in `drop` left out of its
    weight_map, and `add` added."""
    index = folder / "pytorch_model.bin.index.json"
    weight_map = {n: f for n, f in json.loads(index.read_text())["weight_map"].items() if not (drop and n.endswith(drop))}
    weight_map.update(add or {})
    index.write_text(json.dumps({"weight_map": weight_map}))


def test_the_4_bit_check_reads_the_pickles_not_their_index(quantized, tiny_original, tmp_path):
    """A .bin shard index is a list of names beside the shards, and loading reads the shards, never
    the index's names: the check took the weight_map's word. 4-bit shards whose index lists no 4-bit
    tensor passed it (the 16-bit model built, then "42 unexpected tensors"); a 16-bit checkpoint
    whose index names one stale `.qweight` was refused, naming a shard that holds none, though it
    loads."""
    four_bit = _as_pickles(shutil.copytree(quantized["rtn"], tmp_path / "w4"), sharded=True)
    shutil.copy(tiny_original / "config.json", four_bit / "config.json")
    _index_edited(four_bit, drop=(".qweight", ".qzeros", ".scales"))
    with pytest.raises(CheckpointError) as err:
        load_model(four_bit, device="cpu", dtype="float32", max_context=256)
    assert "holds 4-bit AWQ weights (language_model.model.layers.0." in str(err.value)

    sixteen_bit = _as_pickles(shutil.copytree(tiny_original, tmp_path / "w16"), sharded=True)
    _index_edited(sixteen_bit, add={"language_model.model.layers.0.mlp.up_proj.qweight": "pytorch_model-00001-of-00002.bin"})
    load_model(sixteen_bit, device="cpu", dtype="float32", max_context=256)


def test_missing_qzeros_is_named(quantized, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(quantized["rtn"], folder)
    tensors = load_file(folder / "model.safetensors")
    del tensors["language_model.model.layers.0.mlp.down_proj.qzeros"]
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"lacks 1 tensor: language_model\.model\.layers\.0\.mlp\.down_proj\.qzeros"):
        load_model(folder, device="cpu", dtype="float32", max_context=256)


@pytest.mark.parametrize("fused", [False, True])
def test_tinychat_v2_file_loads_to_the_same_weights(tiny_original, tmp_path, fused):
    """A v2 .pt built here from known weights loads to exactly those dequantized weights."""
    state = load_file(next(tiny_original.glob("*.safetensors")))
    group = 64  # TinyChat needs in % 64 == 0; the tiny widths are 64 and 128
    awq, v2 = {}, {}
    for name in list(state):
        if name.startswith("language_model.model.layers.") and name.endswith("_proj.weight"):
            triple = quantize_rtn(state.pop(name).float().t(), group)
            awq[name.removesuffix(".weight")] = triple
    for stem, triple in awq.items():
        qweight, scales, scaled_zeros = awq_to_tinychat_v2(*triple, group_size=group)
        v2[stem] = (qweight, scales, scaled_zeros)
    if fused:  # q/k/v and their biases concatenated on the output axis
        layers = {s.rsplit(".self_attn.", 1)[0] for s in v2 if ".self_attn.q_proj" in s}
        for layer in layers:
            stems = [f"{layer}.self_attn.{p}_proj" for p in "qkv"]
            triples = [awq[s] for s in stems]
            cat = tuple(torch.cat([t[i] for t in triples], dim=1) for i in range(3))
            for s in stems:
                del v2[s]
            v2[f"{layer}.self_attn.qkv_proj"] = awq_to_tinychat_v2(*cat, group_size=group)
            state[f"{layer}.self_attn.qkv_proj.bias"] = torch.cat([state.pop(f"{s}.bias") for s in stems])
    for stem, (qweight, scales, scaled_zeros) in v2.items():
        state[f"{stem}.qweight"], state[f"{stem}.scales"], state[f"{stem}.scaled_zeros"] = qweight, scales, scaled_zeros
    folder = tmp_path / "tinychat"
    folder.mkdir()
    for f in tiny_original.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy2(f, folder / f.name)
    raw = json.loads((folder / "config.json").read_text())
    raw["llm_config"]["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": group, "version": "gemm", "zero_point": True}
    (folder / "config.json").write_text(json.dumps(raw))
    torch.save(state, folder / "model-w4-g64-awq-v2.pt")

    loaded = load_model(folder, device="cpu", dtype="float32", max_context=256, int4_backend="dequant")
    layer = loaded.model.language_model.model.layers[1]
    expected_qkv = torch.cat([dequantize_awq(*awq[f"language_model.model.layers.1.self_attn.{p}_proj"], group, dtype=torch.float32) for p in "qkv"], dim=1)
    assert torch.equal(layer.self_attn.qkv_proj.dequantized_weight_out_in(torch.float32), expected_qkv.t())
    expected_down = dequantize_awq(*awq["language_model.model.layers.1.mlp.down_proj"], group, dtype=torch.float32)
    assert torch.equal(layer.mlp.down_proj.dequantized_weight_out_in(torch.float32), expected_down.t())


def quantize_signalled_while_writing(src: Path, dst: Path, signame: str, ignored_at_start: bool = False):
    """Run `quantize src dst` in a new process that sends itself `signame` once the first file is in
    the staging folder (so it lands mid-write every time); `ignored_at_start`: as `nohup` starts it."""
    import os
    import subprocess
    import sys

    script = (
        "import os, signal, sys\n"
        # as nohup starts it, or as a shell does: pytest itself may run under nohup, its SIGHUP ignored
        + f"signal.signal(signal.{signame}, signal.{'SIG_IGN' if ignored_at_start else 'SIG_DFL'})\n"
        + "import internvl_chat.quantize.pipeline as q\n"
        "real = q.write_checkpoint\n"
        "def write_then_signal(staging, *args, **kwargs):\n"
        "    (staging / 'first.bin').write_bytes(b'x')\n"
        f"    os.kill(os.getpid(), signal.{signame})\n"
        "    return real(staging, *args, **kwargs)\n"
        "q.write_checkpoint = write_then_signal\n"
        "from internvl_chat.cli import main\n"
        f"sys.exit(main(['quantize', {str(src)!r}, {str(dst)!r}, '--method', 'rtn', '--device', 'cpu']))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent), "INTERNVL_CHAT_CONFIG": os.devnull}
    return subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600,
                          stdin=subprocess.DEVNULL)  # fmt: skip


def test_under_nohup_a_sighup_does_not_end_the_run(tiny_original, tmp_path):
    """The command put its own SIGHUP handler over the one `nohup` ignores: closing the terminal of a
    `nohup internvl-chat quantize …` (an hour for a large model) ended it, nothing written."""
    dst = tmp_path / "out"
    run = quantize_signalled_while_writing(tiny_original, dst, "SIGHUP", ignored_at_start=True)
    assert run.returncode == 0, run.stderr
    assert (dst / "config.json").is_file() and (dst / "model.safetensors").is_file()


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGHUP"])
def test_sigterm_while_writing_leaves_no_partial_folder(tiny_original, tmp_path, signame):
    """`kill` during quantize ended the process at once (status -15) and left the hidden
    `.OUT.*.partial` staging folder (a checkpoint's size, for a real model) behind; then it ended
    with status 143 and not a word on stderr, as if it had finished. The signal is sent by the
    process itself once the first file is written, so it lands mid-write every time."""
    import signal

    run = quantize_signalled_while_writing(tiny_original, tmp_path / "out", signame)
    signum = getattr(signal, signame)
    assert run.returncode == 128 + signum, run.stderr
    assert "Traceback" not in run.stderr, run.stderr
    assert run.stderr.splitlines()[-1] == f"internvl-chat: stopped by {signame}", run.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # neither the output nor its staging folder


def test_an_hf_source_with_both_rope_thetas_is_written_with_the_one_it_ran(tiny_hf, tmp_path):
    """An -hf text_config holding rope_theta both at its top and in rope_parameters runs with
    rope_parameters' (transformers 5's order); the output's llm_config, read at its top by the
    original layout's readers, must carry that one, not the source's other top-level value."""
    from internvl_chat.engine.config import load_config
    from internvl_chat.quantize.writer import original_config

    source = json.loads((tiny_hf / "config.json").read_text())
    source["text_config"]["rope_theta"] = 5.0
    source["text_config"]["rope_parameters"] = {"rope_type": "default", "rope_theta": 7.0}
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(source))
    cfg = load_config(src)
    assert cfg.text.rope_theta == 7.0
    assert original_config(src, cfg, GROUP)["llm_config"]["rope_theta"] == 7.0


def test_an_hf_source_without_a_top_level_tie_flag_keeps_its_own_lm_head(tiny_hf, tmp_path):
    """The published -hf configs carry no top-level tie_word_embeddings (transformers 4 leaves a
    default out; transformers ≥ 5 reads its absence as true) yet store InternVL3's own lm_head,
    which the app runs as stored. The output dropped that head and said tie_word_embeddings: true,
    so the quantized model ran with the embeddings as its head: another model."""
    src = tmp_path / "src"
    shutil.copytree(tiny_hf, src)
    raw = json.loads((src / "config.json").read_text())
    raw.pop("tie_word_embeddings")
    (src / "config.json").write_text(json.dumps(raw))
    source = load_model(src, device="cpu", dtype="float32", max_context=64).model.language_model
    assert source.lm_head.weight is not source.model.embed_tokens.weight
    quantize_checkpoint(src, tmp_path / "out", "rtn", group_size=GROUP, device="cpu")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["llm_config"]["tie_word_embeddings"] is False
    stored = load_file(tmp_path / "out" / "model.safetensors")
    assert torch.equal(stored["language_model.lm_head.weight"], source.lm_head.weight.detach().half())
    out = load_model(tmp_path / "out", device="cpu", dtype="float32", max_context=64).model.language_model
    assert out.lm_head.weight is not out.model.embed_tokens.weight
