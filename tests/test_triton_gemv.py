"""The triton int4 backend (quant/triton_gemv.py) on CPU tensors, in Triton's interpreter.

The kernels for CPU tensors are built as interpreted functions explicitly, so it does not matter
when (or whether) triton was imported before; TRITON_INTERPRET=1 only opens the backend on a CPU.
It is set for this module's tests and removed after them, so no other test sees it.
The shapes are small: the interpreter runs every program in Python. (On a GPU: tests/test_cuda.py.)
"""

from __future__ import annotations

import re
import sys

import pytest
import torch

from internvl_chat.errors import UsageError
from internvl_chat.quant import triton_gemv
from internvl_chat.quant.awq_format import dequantize_awq, pack_awq
from internvl_chat.quant.int4_linear import BACKENDS, Int4Linear
from internvl_chat.settings import INT4_BACKENDS

if triton_gemv._import_failure() is not None:
    pytest.skip(f"the triton backend cannot be tested here: {triton_gemv._import_failure()}", allow_module_level=True)

OUT_EPS = {torch.float32: 0.0, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}  # unit roundoff of the output


@pytest.fixture(autouse=True, scope="module")
def _interpreter():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")
        yield


def awq(in_features, out_features, group_size, seed=0, q=None, z=None, scales=None):
    """An AWQ triple: random nibbles, zeros and scales unless given (as [K, N] / [G, N] values)."""
    g = torch.Generator().manual_seed(seed)
    groups = in_features // group_size
    q = torch.randint(0, 16, (in_features, out_features), generator=g) if q is None else q
    z = torch.randint(0, 16, (groups, out_features), generator=g) if z is None else z
    if scales is None:
        scales = (torch.rand(groups, out_features, generator=g) * 0.02 + 0.001).half()
    return pack_awq(q.to(torch.uint8)), pack_awq(z.to(torch.uint8)), scales


def check_against_reference(layer, triple, x, bias):
    """y against x·W + b in float64 from dequantize_awq, within fp32 accumulation error plus one
    rounding to the output dtype, element by element."""
    w = dequantize_awq(*triple, group_size=layer.group_size).double()  # exact values of (q − z)·s
    xd = x.double().reshape(-1, layer.in_features)
    ref = xd @ w + (0 if bias is None else bias.double())
    size = xd.abs() @ w.abs() + (0 if bias is None else bias.double().abs())
    y = layer(x)
    assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], layer.out_features)
    err = (y.double().reshape(ref.shape) - ref).abs()
    bound = 1e-6 * layer.in_features**0.5 * size + OUT_EPS[x.dtype] * ref.abs()
    worst = (err - bound).max().item()
    assert worst <= 0, f"error exceeds the bound by {worst:.3g} (max error {err.max().item():.3g})"
    return y


# (K, N, group, rows, dtype, bias): N not a multiple of the 64-output block, one and several K
# steps and splits (a last split with part of a step), every group size from 8 to 256.
CASES = [
    (256, 72, 32, 1, torch.float32, True),
    (512, 40, 128, 1, torch.bfloat16, False),
    (384, 24, 64, 2, torch.float16, True),
    (1024, 8, 128, 3, torch.bfloat16, True),
    (128, 16, 32, 8, torch.float32, False),
    (512, 8, 256, 1, torch.float16, False),
    (64, 8, 8, 2, torch.bfloat16, True),
    (128, 8, 128, 1, torch.float32, True),
]


@pytest.mark.parametrize("in_features, out_features, group_size, rows, dtype, with_bias", CASES)
def test_gemv_matches_the_dequantized_reference(in_features, out_features, group_size, rows, dtype, with_bias):
    triple = awq(in_features, out_features, group_size, seed=in_features + rows)
    bias = torch.randn(out_features) if with_bias else None
    layer = Int4Linear.from_awq(*triple, bias=bias, group_size=group_size, backend="triton", dtype=dtype)
    assert layer.backend == "triton" and rows <= layer.gemv_max_rows
    x = torch.randn(rows, in_features).to(dtype)
    check_against_reference(layer, triple, x, None if bias is None else bias.to(dtype))


def test_launch_config_splits_k_and_covers_every_group():
    for in_features, out_features, group_size, *_ in CASES + [(3584, 4608, 128), (18944, 3584, 128), (3584, 37888, 128)]:
        block_n, block_g, per_split, splits = triton_gemv.launch_config(in_features, out_features, group_size)
        groups = in_features // group_size
        assert per_split % block_g == 0 and (splits - 1) * per_split < groups <= splits * per_split
    assert triton_gemv.launch_config(3584, 4608, 128)[3] > 1  # qkv of 8B: 72 output blocks need a split
    assert triton_gemv.launch_config(384, 24, 64)[3] > 1  # the case above that tests the reduction


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_extreme_zeros_and_scales(dtype):
    """Zero points 0 and 15 against nibbles 0 and 15, scales from fp16's smallest normal to its largest."""
    in_features, out_features, group_size = 128, 16, 32
    gen = torch.Generator().manual_seed(3)
    groups = in_features // group_size
    q = torch.randint(0, 2, (in_features, out_features), generator=gen) * 15
    z = torch.randint(0, 2, (groups, out_features), generator=gen) * 15
    exponent = torch.randint(-14, 16, (groups, out_features), generator=gen).float()
    scales = (2.0**exponent * (1 + torch.rand(groups, out_features, generator=gen))).clamp(max=65504).half()
    triple = awq(in_features, out_features, group_size, q=q, z=z, scales=scales)
    layer = Int4Linear.from_awq(*triple, group_size=group_size, backend="triton", dtype=dtype)
    x = (torch.rand(1, in_features, generator=gen) * 2 - 1).to(dtype)
    y = check_against_reference(layer, triple, x, None)
    assert torch.isfinite(y).all() and (y != 0).any()


def test_a_row_gets_the_same_bits_in_any_batch():
    triple = awq(256, 40, 64, seed=5)
    layer = Int4Linear.from_awq(*triple, bias=torch.randn(40), group_size=64, backend="triton", dtype=torch.float32)
    x = torch.randn(3, 256)
    assert torch.equal(layer(x)[1], layer(x[1:2])[0])


# (K, N, group, rows, dtype, bias) for the GEMM: from just above the GEMV's rows to its last;
# N not a multiple of its 64-output block, the group count not a multiple of a step's groups
GEMM_CASES = [
    (256, 72, 32, 17, torch.float32, True),
    (512, 40, 128, 40, torch.bfloat16, False),
    (384, 24, 64, 70, torch.float16, True),
    (64, 8, 8, 20, torch.float32, True),
    (768, 16, 256, 128, torch.float32, False),
]


@pytest.mark.parametrize("in_features, out_features, group_size, rows, dtype, with_bias", GEMM_CASES)
def test_gemm_matches_the_dequantized_reference(in_features, out_features, group_size, rows, dtype, with_bias):
    triple = awq(in_features, out_features, group_size, seed=in_features + rows)
    bias = torch.randn(out_features).to(dtype) if with_bias else None
    layer = Int4Linear.from_awq(*triple, bias=bias, group_size=group_size, backend="triton", dtype=dtype)
    assert layer.gemv_max_rows < rows <= layer.gemm_max_rows
    check_against_reference(layer, triple, torch.randn(rows, in_features).to(dtype), bias)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("path", ["gemm", "dense"])
def test_gemm_and_dense_paths_keep_leading_dims(dtype, path):
    triple = awq(256, 48, 32, seed=6)
    bias = torch.randn(48).to(dtype)
    layer = Int4Linear.from_awq(*triple, bias=bias, group_size=32, backend="triton", dtype=dtype)
    rows = layer.gemv_max_rows if path == "gemm" else layer.gemm_max_rows // 2 + 1
    x = torch.randn(2, rows, 256).to(dtype)  # 2·16 rows: the GEMM; 2·65: the dense path
    if dtype == torch.float32:
        check_against_reference(layer, triple, x, bias)
    else:  # the weight is rounded to bf16 before a bf16 matmul: compare with that
        w = dequantize_awq(*triple, group_size=32).to(dtype).float()
        ref = x.float() @ w + bias.float()
        y = layer(x)
        assert y.dtype == dtype and ((y.float() - ref).norm() / ref.norm()).item() < 1e-2
    assert layer(x[:, :0]).shape == (2, 0, 48)


def test_the_forward_makes_no_tensor_from_host_values():
    """Every tensor a forward uses comes from its input and buffers: on a GPU a tensor made from
    Python values is a host copy, which synchronises and breaks CUDA graph capture."""
    from torch.fx.experimental.proxy_tensor import make_fx

    layer = Int4Linear.from_awq(*awq(256, 48, 32), bias=torch.randn(48), group_size=32, backend="triton", dtype=torch.float32)
    names, buffers = zip(*layer.named_buffers())

    def forward(x, *tensors):
        return torch.func.functional_call(layer, dict(zip(names, tensors)), (x,))

    for rows in (1, layer.gemv_max_rows + 1, layer.gemm_max_rows + 1):  # the GEMV, the GEMM and the dense path
        graph = make_fx(forward)(torch.randn(rows, 256), *buffers).graph
        constants = [node.target for node in graph.nodes if node.op == "get_attr"]
        assert not constants, f"{rows} rows: tensors made from host values: {constants}"


def test_dequantized_weight_and_layout():
    triple = awq(256, 24, 64, seed=7)
    layer = Int4Linear.from_awq(*triple, group_size=64, backend="triton")
    want = dequantize_awq(*triple, group_size=64).t()
    assert torch.equal(layer.dequantized_weight_out_in(torch.float32), want)
    assert torch.equal(layer.dequantized_weight_out_in(torch.bfloat16), want.to(torch.bfloat16))
    # The documented layout, nibble by nibble: bits 4i.. of word w of group g in row n hold k = g·64 + i·8 + w.
    q = torch.randint(0, 16, (256, 24), generator=torch.Generator().manual_seed(8))
    packed, _, _ = triton_gemv.repack_awq(pack_awq(q.to(torch.uint8)), *awq(256, 24, 64)[1:], 64)
    for n, word_index, i in [(0, 0, 0), (5, 3, 7), (23, 31, 4), (11, 17, 2)]:
        g, w = divmod(word_index, 8)
        assert (int(packed[n, word_index]) >> (4 * i)) & 0xF == q[g * 64 + i * 8 + w, n]


def test_memory_is_about_half_a_byte_per_weight():
    in_features, out_features, groups = 512, 72, 4
    layer = Int4Linear.from_awq(*awq(in_features, out_features, 128), bias=torch.randn(out_features), backend="triton")
    # int4 weights + fp16 scales + uint8 zeros + bf16 bias
    expected = in_features * out_features // 2 + groups * out_features * 3 + out_features * 2
    assert layer.memory_bytes() == expected


def test_auto_never_picks_triton_and_refusals_are_one_line(monkeypatch):
    triple = awq(256, 64, 128)
    assert "triton" in BACKENDS and INT4_BACKENDS == BACKENDS  # the setting takes what the layer does
    assert Int4Linear.from_awq(*triple, backend="auto").backend != "triton"
    with pytest.raises(UsageError, match="power-of-two group size") as err:
        Int4Linear.from_awq(*awq(192, 64, 96), group_size=96, backend="triton")
    assert "\n" not in str(err.value)
    with pytest.raises(UsageError, match="not on meta"):
        Int4Linear.from_awq(*triple, backend="triton", device="meta")
    monkeypatch.delenv("TRITON_INTERPRET")
    assert not triton_gemv.triton_backend_available("cpu")
    with pytest.raises(UsageError, match="TRITON_INTERPRET=1") as err:
        Int4Linear.from_awq(*triple, backend="triton")
    assert "\n" not in str(err.value) and "use int4 backend 'auto'" in str(err.value)
    if not torch.cuda.is_available():
        assert not triton_gemv.triton_backend_available("cuda")


def test_without_triton_the_backend_is_unavailable(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` raises ImportError
    triton_gemv._import_failure.cache_clear()
    try:
        assert not triton_gemv.triton_backend_available("cpu")
        with pytest.raises(UsageError, match="pip install triton"):
            Int4Linear.from_awq(*awq(256, 64, 128), backend="triton")
    finally:
        triton_gemv._import_failure.cache_clear()


class _Block(torch.nn.Module):
    def __init__(self, triple, group_size):
        super().__init__()
        self.linear = Int4Linear.from_awq(*triple, bias=torch.randn(32), group_size=group_size, backend="triton", dtype=torch.float32)

    def forward(self, x):
        return torch.nn.functional.silu(self.linear(x * 2)) + 1


def test_torch_compile_traces_the_operator_without_graph_breaks():
    torch._dynamo.reset()
    block = _Block(awq(128, 32, 32, seed=9), 32)
    x = torch.randn(1, 128)
    explained = torch._dynamo.explain(block)(x)
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons
    compiled = torch.compile(block, fullgraph=True, backend="eager")
    assert torch.equal(compiled(x), block(x))
    torch._dynamo.reset()


def test_w4_model_decodes_the_dequant_tokens(tiny_original, tmp_path_factory):
    """A tiny W4 checkpoint (RTN, group 32) greedy-decoded with the triton backend (prefill on the
    dense path, each step through the GEMV) gives the dequant backend's tokens."""
    from decode_helpers import greedy_steps

    from internvl_chat.engine.loader import load_model
    from internvl_chat.quantize import quantize_checkpoint

    folder = quantize_checkpoint(tiny_original, tmp_path_factory.mktemp("w4") / "w4", "rtn", group_size=32, device="cpu")
    runs = []
    for backend in ("dequant", "triton"):
        loaded = load_model(folder, device="cpu", dtype="float32", max_context=256, int4_backend=backend)
        linears = [m for m in loaded.model.modules() if isinstance(m, Int4Linear)]
        assert linears and all(m.backend == backend for m in linears)
        runs.append(greedy_steps(loaded.model, list(range(5, 40)), 4))
    (want, want_logits), (got, got_logits) = runs
    assert got == want
    assert (got_logits - want_logits).abs().max().item() <= 1e-4 * want_logits.abs().max().item()


@pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION")  # Triton 3.9 announcing a default it changes
def test_kernels_compile_for_an_h100_with_wide_weight_loads():
    """Triton's real compiler (not the interpreter) on this CPU: the kernels compile for sm_90; with
    16-byte aligned pointers (as Triton specializes them at launch) each GEMV thread reads the
    weight words 128 bits at a time, and the GEMM multiplies on tensor cores from 16-byte
    asynchronous copies."""
    from triton_sm90 import compile_for_sm90

    triton_gemv.ensure_registered()  # builds the compiled kernels: what CUDA tensors get

    block_n, block_g, per_split, _ = triton_gemv.launch_config(3584, 4608, 128)
    pointers = dict(x_ptr="*bf16", w_ptr="*i32", s_ptr="*fp16", z_ptr="*u8", b_ptr="*bf16", out_ptr="*bf16", part_ptr="*fp32")
    gemv = compile_for_sm90(
        triton_gemv.GEMV_KERNEL,
        {**pointers, "M": "i32", "N": "i32", "G": "i32", "magic": "i32"},
        dict(GROUP_WORDS=16, BLOCK_N=block_n, BLOCK_G=block_g, STEPS=per_split // block_g, HAS_BIAS=True, FINAL=False, INTERPRETED=False),
        triton_gemv.NUM_WARPS,
        aligned_ints=("N",),
    )
    assert re.search(r"ld\.global(\.\w+)*\.v4\.[bsu]32", gemv.asm["ptx"]), "the weight loads are not 128 bits wide"
    for block_m in (16, 64):
        gemm = compile_for_sm90(
            triton_gemv.GEMM_KERNEL,
            {**{p: t for p, t in pointers.items() if p != "part_ptr"}, "M": "i32", "N": "i32", "G": "i32"},
            dict(GROUP_WORDS=16, BLOCK_M=block_m, BLOCK_N=triton_gemv.GEMM_BLOCK_N, BLOCK_G=1, STEPS=28, HAS_BIAS=True, INTERPRETED=False),
            triton_gemv.NUM_WARPS,
            aligned_ints=("N",),
        )
        ptx = gemm.asm["ptx"]
        assert re.search(r"wgmma\.mma_async|mma\.sync", ptx), f"BLOCK_M {block_m}: the GEMM does not use tensor cores"
        assert "cp.async.cg.shared.global" in ptx, f"BLOCK_M {block_m}: x and the weight words are not copied 16 bytes at a time"
    compile_for_sm90(
        triton_gemv.REDUCE_KERNEL,
        {"part_ptr": "*fp32", "b_ptr": "*bf16", "out_ptr": "*bf16", "M": "i32", "N": "i32"},
        dict(SPLITS=4, HAS_BIAS=True, BLOCK=triton_gemv.REDUCE_BLOCK),
        triton_gemv.NUM_WARPS,
        aligned_ints=("N",),
    )


# what an H100 or H200 gives one program (Triton refuses a launch that asks for more)
SM90_SHARED_BYTES = 227 * 1024


@pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION")
def test_the_gemm_runs_only_group_sizes_whose_tiles_fit_an_h100():
    """Built for sm_90 by Triton's real compiler, the GEMM's 64-row program needs more shared memory
    as its group (a step's whole groups) grows: every group size it takes fits, the next does not."""
    from triton_sm90 import compile_for_sm90

    triton_gemv.ensure_registered()
    for dtype in ("bf16", "fp32"):
        for group_size in (triton_gemv.GEMM_MAX_GROUP // 2, triton_gemv.GEMM_MAX_GROUP, 2 * triton_gemv.GEMM_MAX_GROUP):
            block_m, block_g = triton_gemv.gemm_config(triton_gemv.GEMM_BLOCK_N, group_size)
            types = dict(x_ptr=f"*{dtype}", w_ptr="*i32", s_ptr="*fp16", z_ptr="*u8", b_ptr=f"*{dtype}", out_ptr=f"*{dtype}",
                         M="i32", N="i32", G="i32")  # fmt: skip
            constants = dict(GROUP_WORDS=group_size // 8, BLOCK_M=block_m, BLOCK_N=triton_gemv.GEMM_BLOCK_N, BLOCK_G=block_g,
                             STEPS=4, HAS_BIAS=True, INTERPRETED=False)  # fmt: skip
            kernel = compile_for_sm90(triton_gemv.GEMM_KERNEL, types, constants, triton_gemv.NUM_WARPS, aligned_ints=("N",))
            fits = kernel.metadata.shared <= SM90_SHARED_BYTES
            assert fits == triton_gemv.gemm_takes(group_size), (dtype, group_size, kernel.metadata.shared)


def test_rows_past_the_gemv_with_a_large_group_take_the_dense_path(monkeypatch):
    # group 512: the GEMM's tiles would not fit an H100 (above); on the CPU's interpreter they would
    group_size, rows = 2 * triton_gemv.GEMM_MAX_GROUP, Int4Linear.gemv_max_rows + 1
    triple = awq(1024, 16, group_size, seed=3)
    layer = Int4Linear.from_awq(*triple, group_size=group_size, backend="triton", dtype=torch.float32)
    gemm_calls = []
    monkeypatch.setattr(triton_gemv, "awq_triton_gemm", lambda *a: gemm_calls.append(a) or pytest.fail("the GEMM ran"))
    check_against_reference(layer, triple, torch.randn(rows, 1024), None)
    assert not gemm_calls


def test_the_operator_names_its_kernels_for_the_compile_cache():
    """torch.compile's AOTAutograd cache keys a graph with our operator by the kernels triton_op
    found in its body; without them an edited kernel could come back from a stale cache."""
    from torch._library import triton as torch_triton

    if not hasattr(torch_triton, "get_triton_kernels_for_op"):
        pytest.skip(f"torch {torch.__version__} does not key its compile cache by an operator's kernels")
    Int4Linear.from_awq(*awq(256, 64, 128), backend="triton")
    found = torch_triton.get_triton_kernels_for_op(triton_gemv.OPERATOR)
    assert {id(k) for k in found} == {id(triton_gemv.GEMV_KERNEL), id(triton_gemv.REDUCE_KERNEL)}
    assert {id(k) for k in torch_triton.get_triton_kernels_for_op(triton_gemv.GEMM_OPERATOR)} == {id(triton_gemv.GEMM_KERNEL)}
