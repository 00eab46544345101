"""Our engine against transformers' InternVLForConditionalGeneration on the same random weights."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from internvl_chat.engine.loader import load_model
from internvl_chat.errors import CheckpointError, ContextOverflowError
from reference import reference_model

TOL = 1e-4  # max|Δ| ≤ TOL · max|ref|, fp32


def _close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    diff = (ours.float() - ref.float()).abs().max().item()
    scale = ref.abs().max().item()
    assert diff <= TOL * scale, f"max|Δ| {diff:.3g} > {TOL} × max|ref| {scale:.3g}"


def _prompt(loaded, tiles: int) -> list[int]:
    s = loaded.special
    tok = loaded.tokenizer
    return (
        [s.im_start]
        + tok.encode("user\n")
        + [s.img_start]
        + [s.img_context] * (256 * tiles)
        + [s.img_end]
        + tok.encode("\nWhat shape is this?")
        + [s.im_end]
        + tok.encode("\n")
        + [s.im_start]
        + tok.encode("assistant\n")
    )


@pytest.fixture(scope="module")
def pixels() -> torch.Tensor:
    return torch.randn(3, 3, 448, 448, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("fixture", ["tiny_original", "tiny_original_6b", "tiny_hf", "tiny_hf_legacy"])
def test_logits_match_transformers(fixture, request, pixels):
    folder = request.getfixturevalue(fixture)
    loaded = load_model(folder, device="cpu", dtype="float32", max_context=2048)
    ref = reference_model(folder)
    ids = _prompt(loaded, tiles=3)
    with torch.no_grad():
        ref_features = ref.model.get_image_features(pixel_values=pixels).pooler_output
        ref_logits = ref(input_ids=torch.tensor([ids]), pixel_values=pixels).logits[0]
    features = loaded.model.encode_images(pixels)
    assert features.shape == (3, 256, loaded.config.text.hidden_size)
    _close(features, ref_features)
    _close(loaded.model.forward(ids, 0, features, all_logits=True), ref_logits)


def test_prefill_then_decode_equals_one_forward(tiny_original, pixels):
    loaded = load_model(tiny_original, device="cpu", dtype="float32", max_context=2048)
    model = loaded.model
    ids = _prompt(loaded, tiles=3) + loaded.tokenizer.encode(" A red circle.")
    features = model.encode_images(pixels)
    full = model.forward(ids, 0, features, all_logits=True)
    split = len(ids) - 5
    parts = [model.forward(ids[:split], 0, features, all_logits=True)]
    for pos in range(split, len(ids)):
        parts.append(model.forward(ids[pos : pos + 1], pos, all_logits=True))
    _close(torch.cat(parts), full)
    # a multi-token chunk at an offset (chunk prefilling) agrees too
    model.forward(ids[:split], 0, features)
    _close(model.forward(ids[split:], split, all_logits=True), full[split:])


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_runs_close_to_fp32(tiny_original, pixels, dtype):
    ref = load_model(tiny_original, device="cpu", dtype="float32", max_context=2048)
    half = load_model(tiny_original, device="cpu", dtype=dtype, max_context=2048)
    ids = _prompt(ref, tiles=1)
    a = ref.model.forward(ids, 0, ref.model.encode_images(pixels[:1]))
    b = half.model.forward(ids, 0, half.model.encode_images(pixels[:1]))
    assert b.dtype == torch.float32 and torch.isfinite(b).all()
    cos = torch.nn.functional.cosine_similarity(a, b, dim=0).item()
    assert cos > 0.99, cos


def test_overflowing_the_cache_is_refused(tiny_original):
    loaded = load_model(tiny_original, device="cpu", dtype="float32", max_context=64)
    with pytest.raises(ContextOverflowError, match="exceed the KV cache of 64"):
        loaded.model.forward(list(range(65)), 0)
    loaded.model.forward(list(range(60)), 0)
    with pytest.raises(ContextOverflowError):
        loaded.model.forward(list(range(5)), 60)


def _edited_copy(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    [weights] = list(dst.glob("*.safetensors"))
    tensors = load_file(weights)
    edit(tensors)
    save_file(tensors, weights, metadata={"format": "pt"})
    return dst


def test_missing_tensor_is_named(tiny_original, tmp_path):
    name = "language_model.model.layers.1.mlp.up_proj.weight"
    folder = _edited_copy(tiny_original, tmp_path / "m", lambda t: t.pop(name))
    with pytest.raises(CheckpointError, match=r"lacks 1 tensor: " + name.replace(".", r"\.")):
        load_model(folder, device="cpu", dtype="float32", max_context=256)


def test_unexpected_tensor_is_named(tiny_original, tmp_path):
    folder = _edited_copy(tiny_original, tmp_path / "u", lambda t: t.update({"language_model.extra.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r"1 unexpected tensor: language_model\.extra\.weight"):
        load_model(folder, device="cpu", dtype="float32", max_context=256)


def test_shape_mismatch_names_tensor_and_shapes(tiny_original, tmp_path):
    name = "mlp1.1.weight"

    def shrink(t):
        t[name] = t[name][:, :-1].contiguous()

    folder = _edited_copy(tiny_original, tmp_path / "s", shrink)
    shape = tuple(load_file(next(Path(tiny_original).glob("*.safetensors")))[name].shape)
    bad = (shape[0], shape[1] - 1)
    with pytest.raises(CheckpointError, match=rf"mlp1\.1\.weight has shape \({bad[0]}, {bad[1]}\) but the config implies \({shape[0]}, {shape[1]}\)"):
        load_model(folder, device="cpu", dtype="float32", max_context=256)


def test_config_vocab_disagreeing_with_weights(tiny_original, tmp_path):
    folder = tmp_path / "v"
    shutil.copytree(tiny_original, folder)
    raw = json.loads((folder / "config.json").read_text())
    raw["llm_config"]["vocab_size"] += 8
    (folder / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match=r"with shape \[512, 64\] but config.json's vocab_size and hidden_size imply \[520, 64\]"):
        load_model(folder, device="cpu", dtype="float32", max_context=256)


def test_truncated_weights_file_is_reported(tiny_original, tmp_path):
    folder = tmp_path / "t"
    shutil.copytree(tiny_original, folder)
    [weights] = list(folder.glob("*.safetensors"))
    data = weights.read_bytes()
    weights.write_bytes(data[:-100])
    with pytest.raises(CheckpointError, match="is truncated"):
        load_model(folder, device="cpu", dtype="float32", max_context=256)
    weights.write_bytes(b"\x05\x00")
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        load_model(folder, device="cpu", dtype="float32", max_context=256)


def test_cpu_default_dtype_follows_native_bf16_and_model_size(monkeypatch):
    """auto on CPU: bf16 for a bandwidth-bound decoder where bf16 decodes fast (native bf16, or
    AVX2 and FMA for the compiled step's GEMV kernel), fp32 otherwise."""
    import bench_lib as bl
    from internvl_chat.engine import cpu_features
    from internvl_chat.engine.loader import resolve_dtype

    big = bl.shape_config("InternVL3-1B", w4=False)
    small = bl.shape_config("tiny", w4=False)
    cpu = torch.device("cpu")
    assert cpu_features.decoder_weight_bytes(big.text) > cpu_features.BF16_MIN_DECODER_BYTES
    assert resolve_dtype("auto", cpu, small) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda"), big) == torch.bfloat16
    flags = cpu_features.cpu_flags()
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")  # oneDNN may not use bf16 instructions
    assert not cpu_features.native_bf16()
    gemv = {"avx2", "fma"} <= flags
    assert resolve_dtype("auto", cpu, big) == (torch.bfloat16 if gemv else torch.float32)
    for without in (frozenset(), flags - {"fma"}):  # no flags at all (not Linux), or AVX2 without FMA
        monkeypatch.setattr(cpu_features, "cpu_flags", lambda without=without: without)
        assert resolve_dtype("auto", cpu, big) == torch.float32
    monkeypatch.setattr(cpu_features, "cpu_flags", lambda: flags | {"avx2", "fma"})
    assert resolve_dtype("auto", cpu, big) == torch.bfloat16
    assert resolve_dtype("auto", cpu, small) == torch.float32  # small: fixed cost, not bytes
    monkeypatch.setattr(cpu_features, "cpu_flags", lambda: flags)
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    native = bool({"avx512_bf16", "amx_bf16"} & flags)
    assert cpu_features.native_bf16() == native
    assert resolve_dtype("auto", cpu, big) == (torch.bfloat16 if native or gemv else torch.float32)
    assert resolve_dtype("float32", cpu, big) == torch.float32  # an explicit choice stands


@pytest.mark.parametrize("text, flags", [
    ("processor\t: 0\nflags\n", set()),  # a "flags" line cut short before its colon: IndexError at start
    ("flags\t\t: fpu avx2 fma\nbugs\t\t: spectre_v1\n", {"fpu", "avx2", "fma"}),
    ("flagship\t: avx2\nflags\t: fma\n", {"fma"}),  # only the line named `flags`
    ("Features\t: fp asimd\n\xff\xfe\n", set()),  # an ARM CPU's, with undecodable bytes
])  # fmt: skip
def test_cpu_flags_from_odd_cpuinfo(tmp_path, monkeypatch, text, flags):
    from internvl_chat.engine import cpu_features

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_bytes(text.encode("latin-1"))
    monkeypatch.setattr(cpu_features, "Path", lambda path: cpuinfo if path == "/proc/cpuinfo" else Path(path))
    cpu_features.cpu_flags.cache_clear()
    try:
        assert cpu_features.cpu_flags() == frozenset(flags)
    finally:
        cpu_features.cpu_flags.cache_clear()


def test_kv_cache_dtype_is_fp32_for_a_small_bf16_decoder_on_a_cpu_without_native_bf16(monkeypatch):
    """Only a small bf16 decoder on a CPU without native bf16 changes the cache's dtype (SDPA's
    fp32 path is the cheaper one there); larger decoders, CUDA, native bf16, fp32 and fp16 keep
    the model's dtype."""
    from internvl_chat.engine import cpu_features

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    small, large = cpu_features.BF16_MIN_DECODER_BYTES - 1, cpu_features.BF16_MIN_DECODER_BYTES
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert cpu_features.kv_cache_dtype(cpu, torch.bfloat16, small) == torch.float32
    assert cpu_features.kv_cache_dtype(cpu, torch.bfloat16, large) == torch.bfloat16
    assert cpu_features.kv_cache_dtype(cuda, torch.bfloat16, small) == torch.bfloat16
    for dtype in (torch.float32, torch.float16):
        assert cpu_features.kv_cache_dtype(cpu, dtype, small) == dtype
    monkeypatch.setattr(cpu_features, "native_bf16", lambda: True)
    assert cpu_features.kv_cache_dtype(cpu, torch.bfloat16, small) == torch.bfloat16


def test_the_vision_tower_computes_in_fp32_on_a_cpu_without_the_model_dtype_natively(tiny_original, pixels, monkeypatch):
    """Emulated bf16 products are ~6× slower than fp32 at the encoder's shapes on such a CPU, so
    there the vision encoder and projector keep fp32 weights (the checkpoint's bf16 values,
    exactly) and hand the decoder features in the model's dtype: the fp32 model's features,
    rounded. CUDA and native bf16 keep the model's dtype."""
    from internvl_chat.engine import cpu_features

    cpu = torch.device("cpu")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        assert cpu_features.vision_dtype(cpu, dtype) == torch.float32
    assert cpu_features.vision_dtype(torch.device("cuda"), torch.bfloat16) == torch.bfloat16
    ref = load_model(tiny_original, device="cpu", dtype="float32", max_context=256).model
    model = load_model(tiny_original, device="cpu", dtype="bfloat16", max_context=256).model
    assert {p.dtype for p in model.vision_model.parameters()} | {p.dtype for p in model.mlp1.parameters()} == {torch.float32}
    assert model.language_model.lm_head.weight.dtype == torch.bfloat16
    features = model.encode_images(pixels[:2])
    assert features.dtype == torch.bfloat16
    assert torch.equal(features, ref.encode_images(pixels[:2]).bfloat16())  # tiny_original stores bf16
    monkeypatch.setattr(cpu_features, "native_bf16", lambda: True)
    monkeypatch.setattr(cpu_features, "native_fp16", lambda: False)
    assert cpu_features.vision_dtype(cpu, torch.bfloat16) == torch.bfloat16
    assert cpu_features.vision_dtype(cpu, torch.float16) == torch.float32
    native = load_model(tiny_original, device="cpu", dtype="bfloat16", max_context=256).model
    assert native.vision_model.embeddings.patch_embedding.weight.dtype == torch.bfloat16


def test_an_fp32_cache_under_bf16_weights_holds_the_bf16_cache_values(tiny_original, monkeypatch):
    """The fp32 cache holds bf16-rounded keys and values (the first layer's exactly a bf16 cache's);
    attention runs in fp32 (a little more precise) and hands bf16 back to the o-projection. A chunk
    prefilled after cached tokens (masked SDPA) gives the logits of the whole prefill."""
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    model = load_model(tiny_original, device="cpu", dtype="bfloat16", max_context=128).model
    lm = model.language_model
    assert lm.k_cache[0].dtype == lm.v_cache[0].dtype == torch.float32
    ids = list(range(5, 45))
    with torch.inference_mode():
        fp32_logits = model.forward(ids, 0, all_logits=True)
        fp32_kv = [t[:, :, :40].clone() for t in lm.k_cache + lm.v_cache]
        chunked = model.forward(ids[20:], 20, all_logits=True)
    lm.allocate_cache(128, torch.device("cpu"), torch.bfloat16)
    with torch.inference_mode():
        bf16_logits = model.forward(ids, 0, all_logits=True)
        bf16_kv = [t[:, :, :40] for t in lm.k_cache + lm.v_cache]
    assert all(torch.equal(t, t.bfloat16().float()) for t in fp32_kv)  # bf16 values, held exactly
    layers = len(lm.k_cache)  # the first layer's inputs are the same: so are its keys and values
    assert torch.equal(fp32_kv[0], bf16_kv[0].float()) and torch.equal(fp32_kv[layers], bf16_kv[layers].float())
    scale = bf16_logits.abs().max().item()
    assert (fp32_logits - bf16_logits).abs().max().item() <= 0.05 * scale
    assert (chunked - fp32_logits[20:]).abs().max().item() <= 0.05 * scale


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_prefill_on_a_cpu_that_emulates_the_dtype_computes_in_fp32(monkeypatch, dtype):
    """Emulated bf16 or fp16 products run ~2-6× slower than fp32 (fp16: ~5× at a 0.5B decoder's
    prefill shapes on Zen 3): a linear with many rows computes in fp32 over its weight upcast."""
    from internvl_chat.engine import cpu_features, language

    gen = torch.Generator().manual_seed(0)
    layer = torch.nn.Linear(64, 48, bias=True).to(dtype)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    x = torch.randn(1, language.UPCAST_MIN_ROWS, 64, generator=gen).to(dtype)
    upcast = torch.nn.functional.linear(x.float(), layer.weight.float(), layer.bias.float()).to(dtype)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert torch.equal(language.linear(layer, x), upcast)
    assert torch.equal(language.linear(layer, x[:, :1]), layer(x[:, :1]))  # one row (decode): unchanged
    # the fp32 weight lives in one buffer per shape, refilled for each weight (no fresh pages per call)
    other = torch.nn.Linear(64, 48, bias=False).to(dtype)
    first = language._upcast(layer.weight)
    with torch.inference_mode():
        second = language._upcast(other.weight)
        assert torch.equal(language.linear(other, x), torch.nn.functional.linear(x.float(), other.weight.float()).to(dtype))
    assert second is first and torch.equal(second, other.weight.float())
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "ALL")
    if cpu_features.computes_natively(dtype):
        assert torch.equal(language.linear(layer, x), layer(x))


def test_a_small_decoder_decodes_on_one_cpu_thread(tiny_original):
    """One-token steps of a small model run single-threaded (a barrier per tiny op otherwise);
    prefill keeps torch's thread count, and the count is restored after each step."""
    from internvl_chat.engine.model import SMALL_DECODER_BYTES

    loaded = load_model(tiny_original, device="cpu", dtype="float32", max_context=256)
    model = loaded.model
    assert model.decode_threads == 1 and model.language_model.decoder_bytes() < SMALL_DECODER_BYTES
    seen = []
    model.language_model.model.layers[0].register_forward_hook(lambda *_: seen.append(torch.get_num_threads()))
    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        model.forward(list(range(8)), 0)
        model.forward([9], 8)
        assert seen == [2, 1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(saved)
