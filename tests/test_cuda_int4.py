"""CUDA checks of our int4 kernels alone: the triton backend's GEMV and GEMM and the dense
paths' one-pass dequantization, compiled for this GPU (run first by scripts/gpu_check.sh: quick,
and what the int4 numbers rest on; skipped without a GPU)."""

from __future__ import annotations

import pytest
import torch

from cuda_graph_helpers import warm_then_capture

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


# ---------------------------------------------------------------------------------------------
# The triton int4 backend (quant/triton_gemv.py): our Triton GEMV and GEMM, compiled for this GPU


def _triton_reason() -> str | None:
    from internvl_chat.quant.triton_gemv import triton_unavailable_reason

    return triton_unavailable_reason("cuda") if torch.cuda.is_available() else "needs a CUDA GPU"


needs_triton = pytest.mark.skipif(_triton_reason() is not None, reason=f"the triton backend cannot run: {_triton_reason()}")
SHAPES_8B = [(3584, 4608), (3584, 37888), (18944, 3584)]  # InternVL3-8B: qkv, gate_up, down
OUT_EPS = {torch.float32: 0.0, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def _triton_layer(in_features, out_features, seed, dtype=torch.bfloat16, bias=True):
    from internvl_chat.quant.int4_linear import Int4Linear
    from test_int4_linear import random_awq

    awq = random_awq(in_features, out_features, seed=seed, device="cuda")
    b = torch.randn(out_features, device="cuda").to(dtype) if bias else None
    layer = Int4Linear.from_awq(*awq, bias=b, backend="triton", dtype=dtype, device="cuda")
    assert layer.backend == "triton"
    return layer, awq, b


def _check_gemv(y, x, awq, bias):
    """y against x·W + b in fp64, element by element: fp32 accumulation error plus one rounding."""
    from internvl_chat.quant.awq_format import dequantize_awq

    w = dequantize_awq(*awq).double()
    xd = x.double()
    ref = xd @ w + (0 if bias is None else bias.double())
    size = xd.abs() @ w.abs() + (0 if bias is None else bias.double().abs())
    bound = 1e-6 * x.shape[-1] ** 0.5 * size + OUT_EPS[x.dtype] * ref.abs()
    worst = ((y.double() - ref).abs() - bound).max().item()
    assert worst <= 0, f"error exceeds the bound by {worst:.3g}"


@needs_triton
@pytest.mark.parametrize("in_features, out_features", SHAPES_8B)
@pytest.mark.parametrize("rows", [1, 3, 16, 40, 128, 300])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_backend_at_8b_shapes(in_features, out_features, rows, dtype):
    layer, awq, bias = _triton_layer(in_features, out_features, seed=rows, dtype=dtype)
    x = torch.randn(rows, in_features, device="cuda").to(dtype)
    y = layer(x)
    assert y.dtype == dtype and y.shape == (rows, out_features)
    if rows <= layer.gemv_max_rows:
        _check_gemv(y, x, awq, bias)
        assert torch.equal(layer(x), y), "the split-K sum is not reproducible"
        assert torch.equal(layer(x[-1:])[0], y[-1]), "a row's result depends on its batch"
    else:  # the GEMM and the dense path: a 16-bit weight (tile) and matmul
        from test_int4_linear import ref_weight, rel_err

        assert rel_err(y, x.float() @ ref_weight(*awq) + bias.float()) < 1e-2
    w = layer.dequantized_weight_out_in(torch.float32)
    from internvl_chat.quant.awq_format import dequantize_awq

    assert torch.equal(w, dequantize_awq(*awq).t())


@needs_triton
def test_triton_backend_in_fp32_is_tight():
    layer, awq, bias = _triton_layer(3584, 4608, seed=11, dtype=torch.float32)
    x = torch.randn(2, 3584, device="cuda")
    _check_gemv(layer(x), x, awq, bias)


@needs_triton
@pytest.mark.parametrize("rows", [1, 8, 40, 200])
def test_triton_backend_under_cuda_graphs_without_syncs(rows):
    layer, awq, bias = _triton_layer(3584, 4608, seed=5)  # split K: both kernels and the partial sums
    x = torch.randn(rows, 3584, device="cuda", dtype=torch.bfloat16)
    graph, y, _ = warm_then_capture(lambda: layer(x))
    torch.cuda.set_sync_debug_mode("error")
    try:
        layer(x)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(y, layer(x))


# ---------------------------------------------------------------------------------------------
# The one-pass dequantization of the dense paths (quant/triton_dequant.py), compiled for this GPU


@needs_triton
@pytest.mark.parametrize("in_features, out_features", SHAPES_8B)
def test_dequant_kernels_give_the_exact_weight(in_features, out_features):
    """Both layouts, bit for bit: each weight exact in fp32, rounded once to the output dtype; and
    the tinygemm layer's dense path (prefill-sized rows) with it against the AWQ weight."""
    from internvl_chat.quant import triton_dequant
    from internvl_chat.quant.awq_format import dequantize_awq
    from internvl_chat.quant.int4_linear import Int4Linear, tinygemm_cuda_rows
    from test_int4_linear import random_awq, ref_weight, rel_err

    awq = random_awq(in_features, out_features, seed=in_features, device="cuda")
    tiny = Int4Linear.from_awq(*awq, backend="torch", device="cuda")
    assert triton_dequant.can_run(tiny.packed_weight)
    q = tinygemm_cuda_rows(tiny.packed_weight)  # [N, K] nibbles, each k-block in block order
    scale_and_zero = tiny.scale_and_zero.double()
    s = scale_and_zero[..., 0].t().repeat_interleave(128, dim=1)
    z = scale_and_zero[..., 1].t().repeat_interleave(128, dim=1)
    exact = ((q.double() - 8) * s + z).float()  # (q − 8)·s is exact in fp32; + z rounds once
    del q, s, z
    for dtype in (torch.bfloat16, torch.float16):
        got = triton_dequant.dequantize_tinygemm(tiny.packed_weight, tiny.scale_and_zero, 128, dtype)
        assert torch.equal(got, exact.to(dtype)), f"tinygemm layout, {dtype}"
    del exact, got
    x = torch.randn(Int4Linear.dense_threshold + 44, in_features, device="cuda").to(torch.bfloat16)
    assert rel_err(tiny(x), x.float() @ ref_weight(*awq)) < 1e-2

    triton_layer = Int4Linear.from_awq(*awq, backend="triton", device="cuda")
    exact = dequantize_awq(*awq, dtype=torch.float64).t()  # (q − z)·s: exact in fp32 too
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        got = triton_dequant.dequantize_repacked(triton_layer.qweight, triton_layer.scales, triton_layer.zeros, 128, dtype)
        assert torch.equal(got, exact.to(dtype)), f"triton layout, {dtype}"
