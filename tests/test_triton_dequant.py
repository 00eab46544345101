"""The one-pass dequantization kernels (quant/triton_dequant.py) on CPU tensors, in Triton's
interpreter, and compiled for sm_90 to read their stores. (On a GPU: tests/test_cuda.py.)

Both kernels compute each weight exactly in fp32 and round it once to the output dtype, so the
checks are bit for bit against float64 references.
"""

from __future__ import annotations

import re

import pytest
import torch

from internvl_chat.quant import triton_dequant, triton_gemv
from internvl_chat.quant.awq_format import dequantize_awq, pack_awq
from internvl_chat.quant.int4_linear import (
    Int4Linear,
    dense_from_tinygemm_cuda,
    dense_weight_block_order,
    tinygemm_cuda_block_order,
)
from test_int4_linear import ref_pack_tinygemm_cuda

if triton_gemv._import_failure() is not None:
    pytest.skip(f"the Triton kernels cannot be tested here: {triton_gemv._import_failure()}", allow_module_level=True)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture
def interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.fixture
def spy(monkeypatch):
    """Counts the calls of both kernels' launchers."""
    calls = []
    for name in ("dequantize_tinygemm", "dequantize_repacked"):
        real = getattr(triton_dequant, name)
        monkeypatch.setattr(triton_dequant, name, lambda *a, real=real, name=name: calls.append(name) or real(*a))
    return calls


def tinygemm_weight(out_features, in_features, inner_k_tiles, group_size, seed):
    """(packed, scale_and_zero, exact [N, K] float64 in block order): a described tinygemm CUDA weight."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (out_features, in_features), generator=g)
    groups = in_features // group_size
    scale = torch.rand(groups, out_features, generator=g) * 0.1 + 0.01
    zero = torch.randn(groups, out_features, generator=g) * 0.1
    scale[0, 0], zero[0, 0] = 300.0, -2.0e3  # large values: (q − 8)·s + z must still round once
    scale_and_zero = torch.stack((scale, zero), dim=-1).to(torch.bfloat16)
    block = 16 * inner_k_tiles
    q_block_order = q.reshape(out_features, -1, block)[:, :, tinygemm_cuda_block_order(inner_k_tiles)]
    s = scale_and_zero[..., 0].double().t().repeat_interleave(group_size, dim=1)
    z = scale_and_zero[..., 1].double().t().repeat_interleave(group_size, dim=1)
    exact = (q_block_order.reshape(out_features, in_features).double() - 8) * s + z
    return ref_pack_tinygemm_cuda(q, inner_k_tiles), scale_and_zero, exact


def repacked_weight(out_features, in_features, group_size, seed):
    """(qweight, scales, zeros, exact [N, K] float64): the triton backend's layout of an AWQ triple."""
    g = torch.Generator().manual_seed(seed)
    groups = in_features // group_size
    q = torch.randint(0, 16, (in_features, out_features), generator=g, dtype=torch.uint8)
    z = torch.randint(0, 16, (groups, out_features), generator=g, dtype=torch.uint8)
    z[0, :2] = torch.tensor([0, 15], dtype=torch.uint8)
    scales = (torch.rand(groups, out_features, generator=g) * 0.02 + 0.001).half()
    scales[0, 0] = 60000.0  # near fp16's largest: (q − z)·s exceeds it, as dequantize_awq then does
    triple = (pack_awq(q), pack_awq(z), scales)
    packed = triton_gemv.repack_awq(*triple, group_size)
    return (*packed, dequantize_awq(*triple, group_size=group_size, dtype=torch.float64).t())


# (N, K, inner k-tiles, group size): N not a multiple of the 32-row block; a row's words fewer
# than, equal to and not a multiple of the 32-word block
TINYGEMM_CASES = [(40, 96, 2, 32), (24, 512, 4, 64), (40, 384, 8, 128), (16, 512, 8, 256), (8, 256, 8, 128)]


@pytest.mark.parametrize("out_features, in_features, inner_k_tiles, group_size", TINYGEMM_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_tinygemm_layout_to_the_exact_weight(interpreter, out_features, in_features, inner_k_tiles, group_size, dtype):
    packed, scale_and_zero, exact = tinygemm_weight(out_features, in_features, inner_k_tiles, group_size, seed=in_features)
    w = triton_dequant.dequantize_tinygemm(packed, scale_and_zero, group_size, dtype)
    assert w.dtype == dtype and w.shape == (out_features, in_features)
    assert torch.equal(w, exact.float().to(dtype))  # fp32 is exact up to + z, then one rounding


# (N, K, group size): every group size from 8 to 256; the group count not a multiple of the block
REPACKED_CASES = [(40, 256, 8), (24, 384, 32), (8, 384, 128), (40, 512, 256), (16, 1024, 64)]


@pytest.mark.parametrize("out_features, in_features, group_size", REPACKED_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_repacked_layout_to_the_exact_weight(interpreter, out_features, in_features, group_size, dtype):
    qweight, scales, zeros, exact = repacked_weight(out_features, in_features, group_size, seed=group_size)
    w = triton_dequant.dequantize_repacked(qweight, scales, zeros, group_size, dtype)
    assert w.dtype == dtype and w.shape == (out_features, in_features)
    assert torch.equal(w, exact.to(dtype))  # (q − z)·s is exact in fp32: one rounding


def test_the_tinygemm_dense_path_runs_the_kernel(interpreter, spy):
    packed, scale_and_zero, exact = tinygemm_weight(40, 384, 8, 128, seed=3)
    x = torch.randn(5, 384, generator=torch.Generator().manual_seed(1))
    y = dense_from_tinygemm_cuda(x, packed, scale_and_zero, 128, tinygemm_cuda_block_order(8))
    assert spy == ["dequantize_tinygemm"]
    x_block_order = x.reshape(5, -1, 128)[:, :, tinygemm_cuda_block_order(8)].reshape(5, 384)
    assert torch.allclose(y.double(), x_block_order.double() @ exact.t(), rtol=1e-5, atol=1e-3)


def test_without_the_interpreter_a_cpu_uses_the_torch_ops(monkeypatch, spy):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    packed, scale_and_zero, exact = tinygemm_weight(16, 256, 8, 128, seed=4)
    w = dense_weight_block_order(packed, scale_and_zero, 128, torch.float32)
    assert spy == []
    assert torch.allclose(w.double(), exact, rtol=1e-6, atol=1e-6)


def test_the_triton_backend_dense_path_runs_the_kernel(interpreter, spy):
    from test_triton_gemv import awq, check_against_reference

    triple = awq(256, 40, 32, seed=2)
    bias = torch.randn(40)
    layer = Int4Linear.from_awq(*triple, bias=bias, group_size=32, backend="triton", dtype=torch.float32)
    x = torch.randn(Int4Linear.gemm_max_rows + 3, 256)
    check_against_reference(layer, triple, x, bias)
    assert spy == ["dequantize_repacked"]


@pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION")  # Triton 3.9 announcing a default it changes
def test_kernels_compile_for_an_h100_with_wide_stores():
    """Triton's real compiler on this CPU: both kernels compile for sm_90 and store the dense
    weight 128 bits (eight bf16) at a time, the traffic that bounds them."""
    from triton_sm90 import compile_for_sm90

    triton_dequant.ensure_registered()  # builds the compiled kernels: what CUDA tensors get
    tinygemm, repacked = triton_dequant.TINYGEMM_KERNEL, triton_dequant.REPACKED_KERNEL
    wide_store = re.compile(r"st\.global(\.\w+)*\.v4\.[bsu]32")
    compiled = compile_for_sm90(
        tinygemm,
        dict(w_ptr="*i32", sz_ptr="*bf16", out_ptr="*bf16", N="i32", K="i32", K_OUTER="i32"),
        dict(HALF_TILES=4, GROUP=128, BLOCK_N=triton_dequant.BLOCK_N, BLOCK_W=triton_dequant.BLOCK_W),
        triton_dequant.NUM_WARPS,
        aligned_ints=("K",),
    )
    assert wide_store.search(compiled.asm["ptx"]), "the tinygemm-layout kernel's stores are not 128 bits wide"
    compiled = compile_for_sm90(
        repacked,
        dict(w_ptr="*i32", s_ptr="*fp16", z_ptr="*u8", out_ptr="*bf16", N="i32", G="i32"),
        dict(GROUP_WORDS=16, BLOCK_N=triton_dequant.BLOCK_N, BLOCK_G=2),
        triton_dequant.NUM_WARPS,
    )
    assert wide_store.search(compiled.asm["ptx"]), "the repacked-layout kernel's stores are not 128 bits wide"


@pytest.mark.parametrize("config", [triton_dequant.DequantConfig(8, 8, 2), triton_dequant.DequantConfig(64, 64, 8)])
def test_other_launch_configurations_give_the_exact_weight(interpreter, config):
    """`*_with_config` (scripts/bench.py's dequant-sweep) under tiles smaller and larger than the
    default's: the same exact values; under the default, the operator's very output."""
    packed, scale_and_zero, exact = tinygemm_weight(40, 384, 8, 128, seed=6)
    w = triton_dequant.dequantize_tinygemm_with_config(packed, scale_and_zero, 128, torch.bfloat16, config)
    assert torch.equal(w, exact.float().to(torch.bfloat16))
    default = triton_dequant.dequantize_tinygemm_with_config(packed, scale_and_zero, 128, torch.bfloat16, triton_dequant.default_config())
    assert torch.equal(default, triton_dequant.dequantize_tinygemm(packed, scale_and_zero, 128, torch.bfloat16))
    qweight, scales, zeros, exact = repacked_weight(40, 512, 32, seed=7)  # 8 words: one group whatever BLOCK_W
    w = triton_dequant.dequantize_repacked_with_config(qweight, scales, zeros, 32, torch.bfloat16, config)
    assert torch.equal(w, exact.to(torch.bfloat16))
    assert torch.equal(w, triton_dequant.dequantize_repacked(qweight, scales, zeros, 32, torch.bfloat16))
