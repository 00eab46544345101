"""Our Triton split-K GEMV for 4-bit AWQ weights: the `triton` backend of `Int4Linear` (SPEC §5).

Made for decode (one row, or a few): y[m, :] = x[m, :]·W + b with W = (q − z)·s per group, read
once from memory in a layout repacked for it at load time.

Resident layout (built once by `repack_awq`, out×in like nn.Linear):
- `qweight` int32 [N, K/8]: row n streams its K weights contiguously. Inside each quantization group
  of g inputs the g/8 words are interleaved: bits 4i..4i+3 of word w hold k = i·(g/8) + w (i = 0..7),
  so the activations a nibble slot needs are g/8 consecutive values (a wide load), not every 8th.
- `scales` [N, K/g] in the checkpoint's float dtype (fp16 as published) and `zeros` uint8 [N, K/g]:
  0.52 B/weight in all for g = 128, as the AWQ tensors.

The kernel (one program per (row m, block of BLOCK_N outputs, K split)): each step loads a
[BLOCK_N, BLOCK_G, g/8] tile of words (BLOCK_G·g ≈ 256 inputs, 128 contiguous bytes per output row,
128-bit loads), turns nibbles into floats exactly with the 2^23 trick (a nibble OR-ed into the
mantissa of 2^23 reads as 2^23 + q, so subtracting 2^23 + z gives q − z with no int→float
conversion; see the kernel for doing it without shifting each nibble down), multiplies by x and
accumulates in fp32 with FMAs, applying the group's scale once per word: 4-5 instructions per
weight in the sm_90 code (ptxas, 64 outputs per program). Rows of a batch are separate programs next to each other in the launch order,
so they read the same weight tile while it is in L2.

Split-K: a decode-sized N alone gives too few programs to fill an H100 (qkv of 8B: 72 blocks of 64
outputs for 132 SMs), so K is split until there are about `TARGET_PROGRAMS`. Each split writes its
fp32 partial sums and a second small kernel adds them in a fixed order (+ bias, cast). We chose that
over atomic adds into a zeroed fp32 buffer: the result is bitwise reproducible, it needs no memset
launch, and the extra traffic (2·SPLIT·M·N·4 B) is 1-3 % of the weight's for 8B's layers. Without a split the one
kernel writes the output itself. The split depends on the weight's shape only, not on M: a row's
result does not change with the batch it is in.

For 17-128 rows (`Int4Linear.gemm_max_rows`; a follow-up turn's prefill) a second operator,
`internvl_chat::awq_triton_gemm`, multiplies on tensor cores: each program takes up to 64 rows by
64 outputs, dequantizes a [64, ≥128] weight tile in registers per step (the interleaved nibbles
flatten to input order) and runs `tl.dot` in x's dtype with fp32 accumulation, so the weight is
read once per 64 rows instead of being dequantized to a dense copy first. Groups larger than 256
need tiles larger than a GPU's shared memory (`GEMM_MAX_GROUP`): their rows take the dense path.

Registered as the torch operator `internvl_chat::awq_triton_gemv` through `torch.library.triton_op`
and `wrap_triton`, so torch.compile traces the kernels (no graph break) and CUDA graphs capture it:
outputs and partial sums are allocated from shapes only, nothing reads back to the host.

CUDA tensors always get the compiled kernels; on a CPU they run in Triton's interpreter (tests
only): `triton_backend_available("cpu")` is true only where TRITON_INTERPRET=1 is set. Triton is imported lazily; where it is missing, or torch
lacks `triton_op`, the backend is unavailable.
"""

from __future__ import annotations

import functools
import os
from typing import NamedTuple

import torch
import torch.nn.functional as F

from internvl_chat.errors import UsageError
from internvl_chat.quant.awq_format import unpack_awq

OPERATOR = "internvl_chat::awq_triton_gemv"
GEMM_OPERATOR = "internvl_chat::awq_triton_gemm"
TARGET_PROGRAMS = 528  # 4 per SM on an H100/H200 (132 SMs); enough to keep every SM streaming
# Outputs per program. Each thread holds BLOCK_N/32 rows, which share its activations (loaded and
# converted once); 64 takes ~130 registers on sm_90 (4 programs per SM). To be swept on a GPU: 32-128.
BLOCK_N = 64
BLOCK_K = 256  # inputs per step (whole groups): 128 contiguous bytes of each output row
NUM_WARPS = 4
MAGIC = 0x4B000000  # the bits of 2^23 as fp32 (a kernel argument, so that it sits in a register)

__all__ = [
    "OPERATOR",
    "GemvConfig",
    "awq_triton_gemm",
    "awq_triton_gemv",
    "check_usable",
    "default_config",
    "dense_from_repacked",
    "dequantize_repacked",
    "ensure_registered",
    "gemm_takes",
    "gemv_with_config",
    "repack_awq",
    "triton_backend_available",
    "triton_shape_supported",
    "triton_unavailable_reason",
]


# ---------------------------------------------------------------------------------------------
# Availability


@functools.cache
def _import_failure() -> str | None:
    """Why Triton and torch's triton_op cannot be used here, or None."""
    if not (hasattr(torch.library, "triton_op") and hasattr(torch.library, "wrap_triton")):
        return f"torch {torch.__version__} lacks torch.library.triton_op (needs torch >= 2.6)"
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as e:  # ImportError, or a broken install raising anything
        return f"Triton cannot be imported ({type(e).__name__}: {e}); it comes with PyTorch's CUDA wheels (pip install triton)"
    return None


def triton_interpreting() -> bool:
    """Whether TRITON_INTERPRET asks for Triton's interpreter (kernels on CPU tensors, for tests)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def triton_unavailable_reason(device: torch.device | str) -> str | None:
    """Why the triton backend cannot run on `device`, or None when it can."""
    device = torch.device(device)
    failure = _import_failure()
    if failure is not None:
        return failure
    if device.type == "cuda":
        return None if torch.cuda.is_available() else "no CUDA GPU is available"
    if device.type == "cpu":
        return None if triton_interpreting() else "on a CPU it runs only in Triton's interpreter (TRITON_INTERPRET=1, for tests)"
    return f"it runs on CUDA GPUs, not on {device.type}"


def triton_backend_available(device: torch.device | str) -> bool:
    """Whether the triton int4 backend can run on `device` (CUDA with Triton; CPU only under
    TRITON_INTERPRET=1)."""
    return triton_unavailable_reason(device) is None


def triton_shape_supported(in_features: int, out_features: int, group_size: int) -> bool:
    """Whether the kernel takes this shape: a power-of-two group size of 8..1024 dividing K, and
    int32 offsets."""
    power_of_two = group_size > 0 and group_size & (group_size - 1) == 0
    return (
        power_of_two
        and 8 <= group_size <= 1024
        and in_features % group_size == 0
        and out_features % 8 == 0
        and out_features * in_features < 2**31
    )


def check_usable(device: torch.device, in_features: int, out_features: int, group_size: int) -> None:
    """Raise a one-line UsageError when int4 backend 'triton' cannot run this linear on `device`."""
    reason = triton_unavailable_reason(device)
    if reason is not None:
        raise UsageError(f"int4 backend 'triton' is unavailable: {reason}; use int4 backend 'auto'.")
    if not triton_shape_supported(in_features, out_features, group_size):
        raise UsageError(
            f"int4 backend 'triton' cannot run a {in_features}→{out_features} linear with group size {group_size} "
            "(needs a power-of-two group size of 8 to 1024); use int4 backend 'auto'."
        )


# ---------------------------------------------------------------------------------------------
# The resident layout


def repack_awq(
    qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The AWQ GEMM triple → (qweight int32 [N, K/8] group-interleaved, scales [N, G], zeros uint8 [N, G])."""
    q = unpack_awq(qweight, torch.uint8)  # [K, N]
    in_features, out_features = q.shape
    groups, words = in_features // group_size, group_size // 8
    # [N, G, i, w] (k = g·group + i·words + w) → [N, G, w, i]: nibble slot i of word w.
    q = q.t().reshape(out_features, groups, 8, words).transpose(2, 3)
    # Byte b of a little-endian int32 holds slots 2b (low nibble) and 2b + 1: bytes only, so the
    # transients stay at a byte per weight.
    as_bytes = (q[..., 0::2] | (q[..., 1::2] << 4)).contiguous()
    packed = as_bytes.view(torch.int32).reshape(out_features, in_features // 8)
    zeros = unpack_awq(qzeros, torch.uint8).t().contiguous()
    return packed, scales.t().contiguous(), zeros


def _nibbles_out_in(qweight: torch.Tensor, group_size: int) -> torch.Tensor:
    """Resident int32 [N, K/8] → 4-bit values uint8 [N, K] in input order."""
    out_features, kw = qweight.shape
    words = group_size // 8
    as_bytes = qweight.contiguous().view(torch.uint8).reshape(out_features, kw, 4, 1)
    shifts = torch.arange(0, 8, 4, dtype=torch.uint8, device=qweight.device)  # a kernel, not a host copy
    nibbles = ((as_bytes >> shifts) & 0xF).reshape(out_features, kw // words, words, 8)  # [N, G, w, i]
    return nibbles.transpose(2, 3).reshape(out_features, kw * 8)


def dequantize_repacked(
    qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int, dtype: torch.dtype
) -> torch.Tensor:
    """W [N, K] (out×in) = (q − z)·s computed in fp32 (exact), then cast: dequantize_awq's values."""
    q = _nibbles_out_in(qweight, group_size)
    out_features, in_features = q.shape
    q = q.reshape(out_features, -1, group_size).to(torch.float32)
    w = (q - zeros.to(torch.float32).unsqueeze(-1)) * scales.to(torch.float32).unsqueeze(-1)
    return w.reshape(out_features, in_features).to(dtype)


def dense_from_repacked(
    x2: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int
) -> torch.Tensor:
    """x2 [M, K] @ W for a prefill-sized M: the weight dequantized in x's dtype, then a dense matmul.

    q − z is exact in any float dtype; s·(q − z) rounds once (twice for bf16 activations with
    fp16 scales, which are rounded to bf16 first). Keeps the transient at the activations' width.
    """
    dtype = x2.dtype
    q = _nibbles_out_in(qweight, group_size)
    out_features, in_features = q.shape
    q = q.reshape(out_features, -1, group_size).to(dtype)
    w = (q - zeros.to(dtype).unsqueeze(-1)) * scales.to(dtype).unsqueeze(-1)
    return F.linear(x2, w.reshape(out_features, in_features))


# ---------------------------------------------------------------------------------------------
# Launch configuration (from shapes only: deterministic, and the same for every M)


class GemvConfig(NamedTuple):
    """A launch configuration of the GEMV: the module's constants (`default_config()`, what the
    app runs) or another set that `gemv_with_config` tries (scripts/bench.py's gemv-sweep)."""

    block_n: int  # outputs per program (a power of two)
    block_k: int  # inputs per step, rounded to whole groups
    num_warps: int
    target_programs: int  # K is split until there are about this many programs


def default_config() -> GemvConfig:
    """The module's constants, read at the call: what the operator launches."""
    return GemvConfig(BLOCK_N, BLOCK_K, NUM_WARPS, TARGET_PROGRAMS)


def launch_config(
    in_features: int, out_features: int, group_size: int, config: GemvConfig | None = None
) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_G, groups per split, number of splits) for a K×N weight under `config`
    (default: the module's constants)."""
    block_n, block_k, _, target_programs = config or default_config()
    groups = in_features // group_size
    block_g = max(1, block_k // group_size)
    n_blocks = -(-out_features // block_n)
    steps = -(-groups // block_g)
    splits = max(1, min(steps, -(-target_programs // n_blocks)))
    groups_per_split = block_g * -(-steps // splits)
    splits = -(-groups // groups_per_split)  # no split left without work
    return block_n, block_g, groups_per_split, splits


# ---------------------------------------------------------------------------------------------
# Kernels (quant/triton_kernels.py, imported on first use: importing this module never imports Triton)


# The compiled kernels (triton.JITFunction, whatever TRITON_INTERPRET says), set by
# `ensure_registered`. Module globals called through `wrap_triton(NAME)` are how triton_op finds
# an operator's kernels, whose source then keys torch.compile's AOTAutograd cache: an edited
# kernel is not served from a stale cache.
GEMV_KERNEL = None
REDUCE_KERNEL = None
GEMM_KERNEL = None
wrap_triton = getattr(torch.library, "wrap_triton", None)  # torch >= 2.6 (checked by availability)


@functools.cache
def _interpreted_kernels():
    """(gemv, reduce, gemm) as Triton interpreter functions, for CPU tensors."""
    from triton.runtime.interpreter import InterpretedFunction

    from internvl_chat.quant import triton_kernels

    return (
        InterpretedFunction(triton_kernels.awq_gemv_kernel),
        InterpretedFunction(triton_kernels.reduce_partials_kernel),
        InterpretedFunction(triton_kernels.awq_gemm_kernel),
    )


REDUCE_BLOCK = 256


def _allocate(x2: torch.Tensor, qweight: torch.Tensor, splits: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows, out_features = x2.shape[0], qweight.shape[0]
    out = torch.empty(rows, out_features, dtype=x2.dtype, device=x2.device)
    part = torch.empty(splits if splits > 1 else 0, rows, out_features, dtype=torch.float32, device=x2.device)
    return out, part


def _gemv(
    x2: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bias: torch.Tensor | None, group_size: int,
    config: GemvConfig | None = None,
) -> torch.Tensor:
    """The operator's body: x2 [M, K] contiguous → [M, N] in x2's dtype (`config`: the module's
    constants unless a benchmark passes another)."""
    config = config or default_config()
    rows = x2.shape[0]
    out_features, in_features = qweight.shape[0], qweight.shape[1] * 8
    block_n, block_g, groups_per_split, splits = launch_config(in_features, out_features, group_size, config)
    out, part = _allocate(x2, qweight, splits)
    if rows == 0:
        return out
    interpreted = x2.device.type == "cpu"
    if interpreted:  # the interpreter truncates fp32 → bf16; torch rounds to nearest even, as a GPU does
        final = out
        out = torch.empty(out.shape, dtype=torch.float32)
    if interpreted:
        gemv, reduce, _ = _interpreted_kernels()
    else:
        gemv, reduce = wrap_triton(GEMV_KERNEL), wrap_triton(REDUCE_KERNEL)
    has_bias = bias is not None
    bias_arg = bias if has_bias else out  # never read without HAS_BIAS
    grid = (rows, -(-out_features // block_n), splits)
    gemv[grid](
        x2, qweight, scales, zeros, bias_arg, out, part if splits > 1 else out,
        rows, out_features, in_features // group_size, MAGIC,
        GROUP_WORDS=group_size // 8, BLOCK_N=block_n, BLOCK_G=block_g, STEPS=groups_per_split // block_g,
        HAS_BIAS=has_bias, FINAL=splits == 1, INTERPRETED=interpreted, num_warps=config.num_warps,
    )  # fmt: skip
    if splits > 1:
        reduce[(rows, -(-out_features // REDUCE_BLOCK))](
            part, bias_arg, out, rows, out_features, SPLITS=splits, HAS_BIAS=has_bias, BLOCK=REDUCE_BLOCK,
            num_warps=NUM_WARPS,
        )
    return final.copy_(out) if interpreted else out


# The GEMM's tiles: 64 outputs by up to 64 rows (at least 16, tl.dot's smallest), ≥ 128 inputs a step
GEMM_BLOCK_N = 64
GEMM_MIN_K = 128
# A GEMM step takes whole groups, so its tiles grow with the group size: built for sm_90, 64 rows
# need 147 KB of shared memory at g = 256 in bf16 (213 KB in fp32) but 295 KB at g = 512, over the
# 227 KB an H100/H200 gives a program (Triton refuses the launch). Larger groups take the dense path.
GEMM_MAX_GROUP = 256


def gemm_takes(group_size: int) -> bool:
    """Whether the GEMM runs this group size (else rows beyond the GEMV take the dense path)."""
    return group_size <= GEMM_MAX_GROUP


def gemm_config(rows: int, group_size: int) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_G) of the GEMM for `rows` rows."""
    block_m = min(64, max(16, 1 << (max(rows, 1) - 1).bit_length()))
    return block_m, max(1, GEMM_MIN_K // group_size)


def _gemm(
    x2: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bias: torch.Tensor | None, group_size: int
) -> torch.Tensor:
    """The GEMM operator's body: x2 [M, K] contiguous → [M, N] in x2's dtype."""
    rows = x2.shape[0]
    out, _ = _allocate(x2, qweight, 1)
    if rows == 0:
        return out
    out_features, groups = qweight.shape[0], qweight.shape[1] * 8 // group_size
    block_m, block_g = gemm_config(rows, group_size)
    interpreted = x2.device.type == "cpu"
    target = torch.empty(out.shape, dtype=torch.float32) if interpreted else out  # as in _gemv
    gemm = _interpreted_kernels()[2] if interpreted else wrap_triton(GEMM_KERNEL)
    has_bias = bias is not None
    gemm[(-(-rows // block_m), -(-out_features // GEMM_BLOCK_N))](
        x2, qweight, scales, zeros, bias if has_bias else target, target, rows, out_features, groups,
        GROUP_WORDS=group_size // 8, BLOCK_M=block_m, BLOCK_N=GEMM_BLOCK_N, BLOCK_G=block_g,
        STEPS=-(-groups // block_g), HAS_BIAS=has_bias, INTERPRETED=interpreted, num_warps=NUM_WARPS,
    )  # fmt: skip
    return out.copy_(target) if interpreted else out


@functools.cache
def ensure_registered() -> None:
    """Register `internvl_chat::awq_triton_gemv` once per process (callers check availability first)."""
    global GEMV_KERNEL, REDUCE_KERNEL, GEMM_KERNEL
    import triton

    from internvl_chat.quant import triton_kernels

    GEMV_KERNEL = triton.JITFunction(triton_kernels.awq_gemv_kernel)
    REDUCE_KERNEL = triton.JITFunction(triton_kernels.reduce_partials_kernel)
    GEMM_KERNEL = triton.JITFunction(triton_kernels.awq_gemm_kernel)

    @torch.library.triton_op(OPERATOR, mutates_args=())
    def awq_triton_gemv_op(
        x2: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bias: torch.Tensor | None, group_size: int
    ) -> torch.Tensor:
        return _gemv(x2, qweight, scales, zeros, bias, group_size)

    # triton_op traces the body for shapes, which the interpreter's kernels (plain Python, run at
    # once) cannot take; outputs from shapes alone serve both.
    @awq_triton_gemv_op.register_fake
    def _(x2, qweight, scales, zeros, bias, group_size):
        return _allocate(x2, qweight, 1)[0]

    @torch.library.triton_op(GEMM_OPERATOR, mutates_args=())
    def awq_triton_gemm_op(
        x2: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bias: torch.Tensor | None, group_size: int
    ) -> torch.Tensor:
        return _gemm(x2, qweight, scales, zeros, bias, group_size)

    @awq_triton_gemm_op.register_fake
    def _(x2, qweight, scales, zeros, bias, group_size):
        return _allocate(x2, qweight, 1)[0]


def awq_triton_gemv(
    x2: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bias: torch.Tensor | None, group_size: int
) -> torch.Tensor:
    """x2 [M, K] @ W (+ bias) → [M, N] in x2's dtype, for the resident layout of `repack_awq`."""
    return torch.ops.internvl_chat.awq_triton_gemv(x2.contiguous(), qweight, scales, zeros, bias, group_size)


def gemv_with_config(
    x2: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bias: torch.Tensor | None, group_size: int,
    config: GemvConfig,
) -> torch.Tensor:
    """The GEMV under launch configuration `config`, called directly rather than through the
    registered operator (whose body always takes the module's constants): for benchmarks that
    try configurations (scripts/bench.py gemv-sweep). Callers check availability first."""
    ensure_registered()  # the compiled kernels that CUDA tensors get
    return _gemv(x2.contiguous(), qweight, scales, zeros, bias, group_size, config)


def awq_triton_gemm(
    x2: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bias: torch.Tensor | None, group_size: int
) -> torch.Tensor:
    """x2 [M, K] @ W (+ bias) → [M, N] in x2's dtype with tensor cores, for a few dozen rows."""
    return torch.ops.internvl_chat.awq_triton_gemm(x2.contiguous(), qweight, scales, zeros, bias, group_size)
