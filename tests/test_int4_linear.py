"""Int4Linear backends against a plain dequantized reference, on CPU and (marked `cuda`) on a GPU.

The reference dequantization here unpacks nibbles with its own bit operations; it does not use
the package's unpack or dequantize code.
"""

from __future__ import annotations

import pytest
import torch
from awq_helpers import random_awq
from cuda_graph_helpers import warm_then_capture

from internvl_chat.errors import UsageError
from internvl_chat.quant.int4_linear import (
    Int4Linear,
    dense_from_tinygemm_cuda,
    int4_backend_supported,
    tinygemm_cuda_block_order,
)

ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # SPEC §2: slot s of word j holds column 8j + ORDER[s]

SHAPES_1B = [(896, 1152), (896, 896), (896, 9728), (4864, 896)]
SHAPES_8B = [(3584, 4608), (3584, 3584), (3584, 37888), (18944, 3584)]

HAS_CUDA = torch.cuda.is_available()
cuda = pytest.mark.cuda
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


def ref_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """AWQ int32 [R, C] → [R, 8C] values, one nibble slot at a time with shifts and masks."""
    out = torch.empty(packed.shape[0], packed.shape[1] * 8, dtype=torch.int32, device=packed.device)
    for s in range(8):
        out[:, ORDER[s] :: 8] = (packed >> (4 * s)) & 0xF
    return out


def ref_weight(qweight, qzeros, scales, group_size=128) -> torch.Tensor:
    """W [K, N] in float32: (q − z)·s."""
    q = ref_nibbles(qweight).float()
    z = ref_nibbles(qzeros).float().repeat_interleave(group_size, dim=0)
    return (q - z) * scales.float().repeat_interleave(group_size, dim=0)


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref.float()).norm() / ref.float().norm()).item()


def check_layer(in_features, out_features, backend, rows, device, dtype=torch.bfloat16, bias=True, seed=0, col_slices=None):
    """Build a random layer, run it, compare with x·W (+ b); `col_slices` limits the reference to a
    few column ranges (multiples of 8) to keep the big CPU cases cheap."""
    qweight, qzeros, scales = random_awq(in_features, out_features, seed=seed, device=device)
    b = torch.randn(out_features, device=device) if bias else None
    layer = Int4Linear.from_awq(qweight, qzeros, scales, bias=b, backend=backend, dtype=dtype, device=device)
    assert layer.backend == backend
    x = torch.randn(rows, in_features, device=device).to(dtype)
    y = layer(x)
    assert y.shape == (rows, out_features) and y.dtype == dtype
    for start, stop in col_slices or [(0, out_features)]:
        w = ref_weight(qweight[:, start // 8 : stop // 8], qzeros[:, start // 8 : stop // 8], scales[:, start:stop])
        ref = x.float() @ w
        if b is not None:
            ref = ref + b[start:stop].float()
        assert rel_err(y[:, start:stop], ref) < 1e-2, (in_features, out_features, backend, rows, start)
    return layer


# ---------------------------------------------------------------------------------------------
# CPU


@pytest.mark.parametrize("backend", ["torch", "dequant"])
@pytest.mark.parametrize("in_features, out_features", SHAPES_1B)
@pytest.mark.parametrize("rows", [1, 64, Int4Linear.dense_threshold + 1])
def test_backends_1b_shapes_cpu(backend, in_features, out_features, rows):
    if backend == "dequant" and (rows > 1 and out_features > 2000):
        pytest.skip("the slow reference backend is checked on the big shape at M=1 only")
    check_layer(in_features, out_features, backend, rows, "cpu", bias=(in_features, out_features) != (896, 896))


@pytest.mark.parametrize(
    "backend, in_features, out_features", [("torch", 3584, 4608), ("dequant", 3584, 4608), ("torch", 18944, 3584)]
)
def test_backends_8b_shapes_cpu(backend, in_features, out_features):
    slices = [(0, 256), (out_features - 256, out_features)]
    check_layer(in_features, out_features, backend, 1, "cpu", bias=False, col_slices=slices)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", ["torch", "dequant"])
def test_dtypes_and_leading_dims_cpu(dtype, backend):
    qweight, qzeros, scales = random_awq(256, 64, seed=1)
    bias = torch.randn(64)
    layer = Int4Linear.from_awq(qweight, qzeros, scales, bias=bias, backend=backend, dtype=dtype)
    x = torch.randn(2, 3, 256).to(dtype)
    y = layer(x)
    assert y.shape == (2, 3, 64) and y.dtype == dtype
    ref = x.float() @ ref_weight(qweight, qzeros, scales) + bias
    assert rel_err(y, ref) < 1e-2
    assert layer(x[:, :0]).shape == (2, 0, 64)


def test_auto_backend_choice_and_errors_cpu():
    awq = random_awq(256, 64)
    assert Int4Linear.from_awq(*awq).backend == "torch"
    narrow = random_awq(256, 8)  # the CPU kernel needs N % 16 == 0
    assert Int4Linear.from_awq(*narrow).backend == "dequant"
    with pytest.raises(UsageError):
        Int4Linear.from_awq(*narrow, backend="torch")
    with pytest.raises(UsageError):
        Int4Linear.from_awq(*awq, backend="marlin")
    assert "backend=torch" in repr(Int4Linear.from_awq(*awq))


def test_int4_backend_supported_cpu_rules():
    assert int4_backend_supported("cpu", 896, 1152, 128)
    assert int4_backend_supported(torch.device("cpu"), 18944, 3584, 128)
    assert not int4_backend_supported("cpu", 896, 8, 128)  # N % 16
    assert not int4_backend_supported("cpu", 960, 1152, 128)  # K % group
    assert not int4_backend_supported("cpu", 960, 1152, 96)  # group size the kernel lacks
    assert not int4_backend_supported("meta", 896, 1152, 128)
    if not HAS_CUDA:
        assert not int4_backend_supported("cuda", 896, 1152, 128)


@pytest.mark.parametrize("backend", ["torch", "dequant"])
def test_memory_is_about_half_a_byte_per_weight(backend):
    in_features, out_features, groups = 896, 1152, 7
    layer = Int4Linear.from_awq(*random_awq(in_features, out_features), bias=torch.randn(1152), backend=backend)
    weights = in_features * out_features // 2
    if backend == "torch":  # packed weight + bf16 (scale, zero) pairs + bf16 bias
        expected = weights + groups * out_features * 4 + out_features * 2
    else:  # qweight + qzeros + fp16 scales + bf16 bias
        expected = weights + groups * out_features // 2 + groups * out_features * 2 + out_features * 2
    assert layer.memory_bytes() == expected
    assert layer.memory_bytes() < 0.56 * in_features * out_features


# ---------------------------------------------------------------------------------------------
# The tinygemm CUDA layout, described element by element from PyTorch's int4mm.cu
# (`matrix_to_m16n8k16_Bint4_layout`): int32 [N/8, K/(16t), 32, t/2], element
# [nt, ko, lane, i2] slot j = 4h + jj holds q[8·nt + lane // 4, 16t·ko + 32·i2 + 8·jj + 2·(lane % 4) + h].


def ref_pack_tinygemm_cuda(q_out_in: torch.Tensor, inner_k_tiles: int) -> torch.Tensor:
    n_out, n_in = q_out_in.shape
    t = inner_k_tiles
    out = torch.zeros(n_out // 8, n_in // (16 * t), 32, t // 2, dtype=torch.int32)
    for nt in range(n_out // 8):
        for ko in range(n_in // (16 * t)):
            for lane in range(32):
                for i2 in range(t // 2):
                    word = 0
                    for h in range(2):
                        for jj in range(4):
                            n = 8 * nt + lane // 4
                            k = 16 * t * ko + 32 * i2 + 8 * jj + 2 * (lane % 4) + h
                            word |= int(q_out_in[n, k]) << (4 * (4 * h + jj))
                    out[nt, ko, lane, i2] = word - (1 << 32) if word >= (1 << 31) else word
    return out


def unpack_tinygemm_cuda(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of ref_pack_tinygemm_cuda, by reshaping instead of loops: int32 [N/8, K/(16t),
    32, t/2] → 4-bit values uint8 [N, K] (out×in)."""
    n_tiles, k_outer, lanes, half_tiles = packed.shape
    as_bytes = packed.contiguous().view(torch.uint8)  # [..., t/2 * 4]; byte b = slots 2b, 2b + 1
    nibbles = torch.stack((as_bytes & 0xF, as_bytes >> 4), dim=-1)
    # [nt, ko, lane_hi(8), lane_lo(4), i2, h(2), jj(4)] → n = (nt, lane_hi), k = (ko, i2, jj, lane_lo, h)
    nibbles = nibbles.reshape(n_tiles, k_outer, lanes // 4, 4, half_tiles, 2, 4)
    ordered = nibbles.permute(0, 2, 1, 4, 6, 3, 5)
    return ordered.reshape(n_tiles * 8, k_outer * half_tiles * 2 * 16)


@pytest.mark.parametrize("inner_k_tiles", [2, 4, 8])
def test_unpack_tinygemm_cuda_layout(inner_k_tiles):
    q = torch.randint(0, 16, (16, 256), generator=torch.Generator().manual_seed(inner_k_tiles))
    packed = ref_pack_tinygemm_cuda(q, inner_k_tiles)
    assert torch.equal(unpack_tinygemm_cuda(packed).long(), q)


@pytest.mark.parametrize("inner_k_tiles, group_size", [(2, 32), (4, 64), (8, 128), (8, 256)])
def test_dense_path_math_on_a_described_layout(inner_k_tiles, group_size):
    """The CUDA dense path (block-ordered weight, permuted activations), run on CPU tensors."""
    gen = torch.Generator().manual_seed(group_size)
    n_out, n_in = 24, 512
    q = torch.randint(0, 16, (n_out, n_in), generator=gen)
    scale = torch.rand(n_in // group_size, n_out, generator=gen) * 0.1 + 0.01
    zero = torch.randn(n_in // group_size, n_out, generator=gen) * 0.1
    scale_and_zero = torch.stack((scale, zero), dim=-1).to(torch.bfloat16)
    packed = ref_pack_tinygemm_cuda(q, inner_k_tiles)
    x = torch.randn(5, n_in, generator=gen)
    y = dense_from_tinygemm_cuda(x, packed, scale_and_zero, group_size, tinygemm_cuda_block_order(inner_k_tiles))
    s = scale_and_zero[..., 0].float().repeat_interleave(group_size, dim=0)
    z = scale_and_zero[..., 1].float().repeat_interleave(group_size, dim=0)
    w = (q.t().float() - 8) * s + z  # tinygemm: (q − 8)·scale + zero, W [K, N]
    assert y.dtype == torch.float32
    assert torch.allclose(y, x @ w, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# CUDA (run on a GPU by scripts/gpu_check.sh)


@cuda
@needs_cuda
def test_cuda_auto_picks_torch_on_sm80():
    major, _ = torch.cuda.get_device_capability()
    layer = Int4Linear.from_awq(*random_awq(896, 1152, device="cuda"))
    assert layer.backend == ("torch" if major >= 8 else "dequant")


@cuda
@needs_cuda
@pytest.mark.parametrize("inner_k_tiles", [2, 4, 8])
def test_cuda_packing_op_matches_described_layout(inner_k_tiles):
    q = torch.randint(0, 16, (32, 512), generator=torch.Generator().manual_seed(7))
    as_bytes = ((q[:, 0::2] << 4) | q[:, 1::2]).to(torch.uint8).cuda()
    packed = torch.ops.aten._convert_weight_to_int4pack(as_bytes, inner_k_tiles)
    assert torch.equal(packed.cpu(), ref_pack_tinygemm_cuda(q, inner_k_tiles))
    assert torch.equal(unpack_tinygemm_cuda(packed).long().cpu(), q)


@cuda
@needs_cuda
@pytest.mark.parametrize("backend", ["torch", "dequant"])
@pytest.mark.parametrize("in_features, out_features", SHAPES_1B + SHAPES_8B)
@pytest.mark.parametrize("rows", [1, 64, Int4Linear.dense_threshold + 1, 300])
def test_backends_cuda(backend, in_features, out_features, rows):
    check_layer(in_features, out_features, backend, rows, "cuda", seed=rows)


@cuda
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_cuda_dense_path_matches_kernel(dtype):
    awq = random_awq(3584, 4608, device="cuda", seed=3)
    layer = Int4Linear.from_awq(*awq, bias=torch.randn(4608, device="cuda"), dtype=dtype)
    x = torch.randn(32, 3584, device="cuda").to(dtype)
    kernel = layer(x)
    layer.dense_threshold = 0  # force the dequantize-and-matmul path for the same rows
    dense = layer(x)
    assert dense.dtype == kernel.dtype == dtype
    assert rel_err(dense, kernel) < 1e-2
    ref = x.float() @ ref_weight(*awq)
    assert rel_err(dense, ref + layer.bias.float()) < 1e-2
    # The dense weight is exactly (q − 8)·scale + zero from the bf16 (scale, zero) pairs.
    w = layer.dequantized_weight_out_in(torch.float32).t()
    assert rel_err(w, ref_weight(*awq)) < 5e-3


@cuda
@needs_cuda
@pytest.mark.parametrize("backend", ["torch", "dequant"])
@pytest.mark.parametrize("rows", [1, 200])
def test_cuda_forward_does_not_synchronise(backend, rows):
    layer = Int4Linear.from_awq(*random_awq(896, 1152, device="cuda"), bias=torch.randn(1152, device="cuda"), backend=backend)
    x = torch.randn(rows, 896, device="cuda", dtype=torch.bfloat16)
    layer(x)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        layer(x)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@cuda
@needs_cuda
@pytest.mark.parametrize("backend, rows", [("torch", 1), ("torch", 200), ("dequant", 3)])
def test_cuda_graph_capture_and_replay(backend, rows):
    awq = random_awq(896, 1152, device="cuda", seed=5)
    layer = Int4Linear.from_awq(*awq, backend=backend)
    x = torch.randn(rows, 896, device="cuda", dtype=torch.bfloat16)
    graph, y, _ = warm_then_capture(lambda: layer(x))
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    assert rel_err(y, x.float() @ ref_weight(*awq)) < 1e-2
