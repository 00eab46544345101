"""One-pass dequantization of the resident 4-bit layouts, for prefill-sized batches (Triton).

Above a few rows, the CUDA int4 backends multiply by a dense weight dequantized on the fly
(`Int4Linear.dense_threshold`, `gemv_max_rows`). Done with torch ops that is a chain of kernels,
each a full pass over the weight at a byte or more per weight (copy the packed chunks, shift and
mask to bytes, convert, multiply-add): ~5.5 B of traffic per weight before the matmul reads its
2 B. One Triton kernel here reads the packed weight (0.5 B) and writes the dense one (2 B), so
a W4 prefill pays little more than the bf16 matmul it then runs.

Values: computed exactly in fp32 and rounded once to the output dtype — (q − 8)·s + z for the
tinygemm layout (its k-blocks in block order, as the dense path wants them), (q − z)·s in input
order for the triton backend's layout (`dequantize_awq`'s values). Where Triton cannot run (no
Triton, or a CPU without TRITON_INTERPRET=1), callers use the torch ops instead (`can_run`).

Registered as the torch operators `internvl_chat::awq_dequant_tinygemm` / `awq_dequant_repacked`
(`triton_op`), so tracing sees one call each. CUDA tensors get the compiled kernels; CPU tensors
run them in Triton's interpreter (tests).

The launch constants (`BLOCK_N`, `BLOCK_W`, `NUM_WARPS`) can be overridden per call by
`dequantize_tinygemm_with_config` / `dequantize_repacked_with_config` (a `DequantConfig`),
outside the operators: scripts/bench.py's dequant-sweep tries configurations that way.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from internvl_chat.quant import triton_gemv

BLOCK_N = 32  # output rows per program: four 8-row tiles of the tinygemm layout
BLOCK_W = 32  # packed words per row per program: 256 weights, 512 contiguous bytes of bf16 out
NUM_WARPS = 4


class DequantConfig(NamedTuple):
    """A launch configuration of both kernels: the module's constants (`default_config()`, what
    the app runs) or another set that a benchmark tries (scripts/bench.py's dequant-sweep)."""

    block_n: int  # output rows per program (a power of two)
    block_w: int  # packed words per row per program (a power of two); the repacked kernel takes whole groups
    num_warps: int


def default_config() -> DequantConfig:
    """The module's constants, read at the call: what the operators launch."""
    return DequantConfig(BLOCK_N, BLOCK_W, NUM_WARPS)


TINYGEMM_OPERATOR = "internvl_chat::awq_dequant_tinygemm"
REPACKED_OPERATOR = "internvl_chat::awq_dequant_repacked"


def can_run(packed: torch.Tensor) -> bool:
    """Whether the kernels can dequantize this resident weight here."""
    # int32 offsets inside the kernels: out[n, k] and the packed words
    return packed.numel() * 8 < 2**31 and triton_gemv.triton_unavailable_reason(packed.device) is None


# The compiled kernels, set by `ensure_registered` (module globals called through `wrap_triton`:
# how triton_op finds an operator's kernels, as in quant/triton_gemv.py).
TINYGEMM_KERNEL = None
REPACKED_KERNEL = None


@functools.cache
def _interpreted_kernels():
    """(tinygemm, repacked) as Triton interpreter functions, for CPU tensors."""
    from triton.runtime.interpreter import InterpretedFunction

    from internvl_chat.quant import triton_kernels

    return InterpretedFunction(triton_kernels.dequant_tinygemm_kernel), InterpretedFunction(triton_kernels.dequant_repacked_kernel)


def _output(rows: int, cols: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.empty(rows, cols, dtype=dtype, device=device)


def _launch(which: int, grid: tuple[int, int], inputs: tuple, out: torch.Tensor, sizes: tuple, **meta) -> torch.Tensor:
    """Kernel `which` (0: tinygemm, 1: repacked) from `inputs` into `out`. On a CPU it is
    interpreted and writes fp32 that torch rounds (the interpreter truncates when it stores bf16)."""
    if out.device.type == "cpu":
        wide = torch.empty(out.shape, dtype=torch.float32)
        _interpreted_kernels()[which][grid](*inputs, wide, *sizes, **meta)
        return out.copy_(wide)
    triton_gemv.wrap_triton((TINYGEMM_KERNEL, REPACKED_KERNEL)[which])[grid](*inputs, out, *sizes, **meta)
    return out


def _tinygemm_shape(packed: torch.Tensor) -> tuple[int, int]:
    n_tiles, k_outer, _, half_tiles = packed.shape
    return n_tiles * 8, k_outer * 32 * half_tiles


def tinygemm_grid(out_features: int, in_features: int, block_n: int, block_w: int) -> tuple[int, int]:
    """Programs of the tinygemm-layout kernel: (row blocks, blocks of `block_w` words per row)."""
    return -(-out_features // block_n), -(-(in_features // 8) // block_w)


def repacked_block_groups(group_size: int, block_w: int) -> int:
    """Groups per program of the repacked-layout kernel: `block_w` words' worth, at least one."""
    return max(1, block_w * 8 // group_size)


def repacked_grid(out_features: int, groups: int, block_n: int, block_g: int) -> tuple[int, int]:
    """Programs of the repacked-layout kernel: (row blocks, blocks of `block_g` groups)."""
    return -(-out_features // block_n), -(-groups // block_g)


def _dequantize_tinygemm(
    packed: torch.Tensor, scale_and_zero: torch.Tensor, group_size: int, dtype: torch.dtype, config: DequantConfig | None = None
) -> torch.Tensor:
    """The operator's body (`config`: the module's constants unless a benchmark passes another)."""
    block_n, block_w, num_warps = config if config is not None else (BLOCK_N, BLOCK_W, NUM_WARPS)
    out_features, in_features = _tinygemm_shape(packed)
    out = _output(out_features, in_features, dtype, packed.device)
    grid = tinygemm_grid(out_features, in_features, block_n, block_w)
    return _launch(
        0, grid, (packed, scale_and_zero), out, (out_features, in_features, packed.shape[1]),
        HALF_TILES=packed.shape[3], GROUP=group_size, BLOCK_N=block_n, BLOCK_W=block_w, num_warps=num_warps,
    )  # fmt: skip


def _dequantize_repacked(
    qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int, dtype: torch.dtype,
    config: DequantConfig | None = None,
) -> torch.Tensor:  # fmt: skip
    """The operator's body (`config`: the module's constants unless a benchmark passes another)."""
    block_n, block_w, num_warps = config if config is not None else (BLOCK_N, BLOCK_W, NUM_WARPS)
    out_features, in_features = qweight.shape[0], qweight.shape[1] * 8
    groups = in_features // group_size
    block_g = repacked_block_groups(group_size, block_w)
    out = _output(out_features, in_features, dtype, qweight.device)
    grid = repacked_grid(out_features, groups, block_n, block_g)
    return _launch(
        1, grid, (qweight, scales, zeros), out, (out_features, groups),
        GROUP_WORDS=group_size // 8, BLOCK_N=block_n, BLOCK_G=block_g, num_warps=num_warps,
    )  # fmt: skip


@functools.cache
def ensure_registered() -> None:
    """Register both operators once per process (callers check `can_run` first). As operators,
    torch.compile and make_fx trace them as single calls and CUDA graphs capture them."""
    global TINYGEMM_KERNEL, REPACKED_KERNEL
    import triton

    from internvl_chat.quant import triton_kernels

    TINYGEMM_KERNEL = triton.JITFunction(triton_kernels.dequant_tinygemm_kernel)
    REPACKED_KERNEL = triton.JITFunction(triton_kernels.dequant_repacked_kernel)

    @torch.library.triton_op(TINYGEMM_OPERATOR, mutates_args=())
    def tinygemm_op(packed: torch.Tensor, scale_and_zero: torch.Tensor, group_size: int, dtype: torch.dtype) -> torch.Tensor:
        return _dequantize_tinygemm(packed, scale_and_zero, group_size, dtype)

    @tinygemm_op.register_fake  # outputs from shapes alone: the interpreter cannot run on fake tensors
    def _(packed, scale_and_zero, group_size, dtype):
        return _output(*_tinygemm_shape(packed), dtype, packed.device)

    @torch.library.triton_op(REPACKED_OPERATOR, mutates_args=())
    def repacked_op(
        qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int, dtype: torch.dtype
    ) -> torch.Tensor:
        return _dequantize_repacked(qweight, scales, zeros, group_size, dtype)

    @repacked_op.register_fake
    def _(qweight, scales, zeros, group_size, dtype):
        return _output(qweight.shape[0], qweight.shape[1] * 8, dtype, qweight.device)


def dequantize_tinygemm(packed: torch.Tensor, scale_and_zero: torch.Tensor, group_size: int, dtype: torch.dtype) -> torch.Tensor:
    """Tinygemm's CUDA int32 [N/8, K/(16t), 32, t/2] and (scale, zero) [G, N, 2] → dense [N, K] of
    `dtype`, each 16t-wide k-block in block order (see `tinygemm_cuda_block_order`)."""
    ensure_registered()
    return torch.ops.internvl_chat.awq_dequant_tinygemm(packed.contiguous(), scale_and_zero.contiguous(), group_size, dtype)


def dequantize_repacked(
    qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int, dtype: torch.dtype
) -> torch.Tensor:
    """The triton backend's int32 [N, K/8], scales [N, G] and uint8 zeros [N, G] → dense [N, K] of `dtype`."""
    ensure_registered()
    return torch.ops.internvl_chat.awq_dequant_repacked(qweight.contiguous(), scales.contiguous(), zeros.contiguous(), group_size, dtype)


def dequantize_tinygemm_with_config(
    packed: torch.Tensor, scale_and_zero: torch.Tensor, group_size: int, dtype: torch.dtype, config: DequantConfig
) -> torch.Tensor:
    """`dequantize_tinygemm` under launch configuration `config`, called directly rather than
    through the registered operator (whose body always takes the module's constants): for
    benchmarks that try configurations (scripts/bench.py dequant-sweep). Callers check `can_run`."""
    ensure_registered()  # the compiled kernels that CUDA tensors get
    return _dequantize_tinygemm(packed.contiguous(), scale_and_zero.contiguous(), group_size, dtype, config)


def dequantize_repacked_with_config(
    qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int, dtype: torch.dtype, config: DequantConfig
) -> torch.Tensor:
    """`dequantize_repacked` under launch configuration `config` (see dequantize_tinygemm_with_config)."""
    ensure_registered()
    return _dequantize_repacked(qweight.contiguous(), scales.contiguous(), zeros.contiguous(), group_size, dtype, config)
