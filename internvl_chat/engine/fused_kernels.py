"""Triton kernels of the fused eager decoder: engine/fused.py imports this module only where it
launches them, and decorates these functions there (`triton.jit` for CUDA tensors, interpreted for
CPU tensors in tests), as quant/triton_kernels.py's are.

Each rounds where the torch expression it replaces rounds (language.py), so a bf16 model gives
the same values up to the order of a sum and fused multiply-adds in float32.
"""

from __future__ import annotations

import triton.language as tl


def add_rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, sum_ptr, D, eps, HAS_RES: tl.constexpr, BLOCK: tl.constexpr, INTERPRETED: tl.constexpr,
):  # fmt: skip
    """One row: h = x (+ res, rounded to x's dtype, stored to sum_ptr); out = w · round(h / rms(h))."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    inside = cols < D
    x = tl.load(x_ptr + row * D + cols, mask=inside, other=0.0)
    if HAS_RES:
        r = tl.load(res_ptr + row * D + cols, mask=inside, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(sum_ptr + row * D + cols, x, mask=inside)
    h = x.to(tl.float32)
    if INTERPRETED:
        # tl.sum is a jitted helper, compiled or interpreted as TRITON_INTERPRET said when triton
        # was imported; the interpreter runs a reduce with the standard sum combiner as np.sum
        mean_square = tl.reduce(h * h, 0, tl.standard._sum_combine) / D
    else:
        mean_square = tl.sum(h * h, axis=0) / D
    normed = (h * tl.rsqrt(mean_square + eps)).to(x_ptr.dtype.element_ty)  # RMSNorm casts back before the weight
    w = tl.load(w_ptr + cols, mask=inside, other=0.0)
    tl.store(out_ptr + row * D + cols, (normed.to(tl.float32) * w.to(tl.float32)).to(out_ptr.dtype.element_ty), mask=inside)


def silu_mul_kernel(gate_up_ptr, out_ptr, INTER, BLOCK: tl.constexpr):
    """Row r, block b: out[r, i] = round(silu(gate[r, i])) · up[r, i], gate_up = [gate | up]."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = cols < INTER
    gate = tl.load(gate_up_ptr + row * 2 * INTER + cols, mask=inside, other=0.0).to(tl.float32)
    up = tl.load(gate_up_ptr + row * 2 * INTER + INTER + cols, mask=inside, other=0.0).to(tl.float32)
    silu = (gate / (1.0 + tl.exp(-gate))).to(gate_up_ptr.dtype.element_ty)
    tl.store(out_ptr + row * INTER + cols, (silu.to(tl.float32) * up).to(out_ptr.dtype.element_ty), mask=inside)


def rope_cache_kernel(
    qkv_ptr, cos_ptr, sin_ptr, pos_ptr, q_ptr, k_cache_ptr, v_cache_ptr, start, cache_len,
    HEADS: tl.constexpr, KV_HEADS: tl.constexpr, HALF: tl.constexpr, POSITIONS_IN_TENSOR: tl.constexpr,
):  # fmt: skip
    """Token t, head h of the fused qkv row [q heads | k heads | v heads] (each 2·HALF wide):
    q heads rotated into q [T, HEADS, 2·HALF]; k heads rotated and v heads copied into the caches
    [KV_HEADS, cache_len, 2·HALF] at the token's position (pos_ptr[t], or start + t)."""
    t = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    i = tl.arange(0, HALF)
    src = qkv_ptr + t * (HEADS + 2 * KV_HEADS) * 2 * HALF + head * 2 * HALF
    if POSITIONS_IN_TENSOR:
        pos = tl.load(pos_ptr + t).to(tl.int64)
    else:
        pos = start + t
    if head < HEADS + KV_HEADS:
        x1 = tl.load(src + i).to(tl.float32)
        x2 = tl.load(src + HALF + i).to(tl.float32)
        c = tl.load(cos_ptr + t * HALF + i)
        s = tl.load(sin_ptr + t * HALF + i)
        y1 = (x1 * c - x2 * s).to(qkv_ptr.dtype.element_ty)  # apply_rope rounds once, to the dtype
        y2 = (x2 * c + x1 * s).to(qkv_ptr.dtype.element_ty)
        if head < HEADS:
            dst = q_ptr + (t * HEADS + head) * 2 * HALF
        else:
            dst = k_cache_ptr + ((head - HEADS) * cache_len + pos) * 2 * HALF
        tl.store(dst + i, y1)
        tl.store(dst + HALF + i, y2)
    else:
        dst = v_cache_ptr + ((head - HEADS - KV_HEADS) * cache_len + pos) * 2 * HALF
        tl.store(dst + i, tl.load(src + i))
        tl.store(dst + HALF + i, tl.load(src + HALF + i))
