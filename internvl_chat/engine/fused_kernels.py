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
    qkv_ptr, bias_ptr, cos_ptr, sin_ptr, pos_ptr, q_ptr, k_cache_ptr, v_cache_ptr, start, cache_len,
    HEADS: tl.constexpr, KV_HEADS: tl.constexpr, HALF: tl.constexpr, POSITIONS_IN_TENSOR: tl.constexpr,
    HAS_BIAS: tl.constexpr,
):  # fmt: skip
    """Token t, head h of the fused qkv row [q heads | k heads | v heads] (each 2·HALF wide), its
    bias added first where the linear left it (rounded to the dtype, as `y + bias` is): q heads
    rotated into q [T, HEADS, 2·HALF]; k heads rotated and v heads copied into the caches
    [KV_HEADS, cache_len, 2·HALF] at the token's position (pos_ptr[t], or start + t)."""
    t = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    i = tl.arange(0, HALF)
    src = qkv_ptr + t * (HEADS + 2 * KV_HEADS) * 2 * HALF + head * 2 * HALF
    if POSITIONS_IN_TENSOR:
        pos = tl.load(pos_ptr + t).to(tl.int64)
    else:
        pos = start + t
    first = tl.load(src + i)
    second = tl.load(src + HALF + i)
    if HAS_BIAS:
        first = (first.to(tl.float32) + tl.load(bias_ptr + head * 2 * HALF + i).to(tl.float32)).to(qkv_ptr.dtype.element_ty)
        second = (second.to(tl.float32) + tl.load(bias_ptr + head * 2 * HALF + HALF + i).to(tl.float32)).to(qkv_ptr.dtype.element_ty)
    if head < HEADS + KV_HEADS:
        x1 = first.to(tl.float32)
        x2 = second.to(tl.float32)
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
        tl.store(dst + i, first)
        tl.store(dst + HALF + i, second)


def decode_attention_kernel(
    q_ptr, k_ptr, v_ptr, last_ptr, acc_ptr, ml_ptr, last_key, cache_len, scale,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HD: tl.constexpr, SPLIT: tl.constexpr, BLOCK_N: tl.constexpr,
    LAST_IN_TENSOR: tl.constexpr, IEEE: tl.constexpr, INTERPRETED: tl.constexpr,
):  # fmt: skip
    """One token's attention, split over the KV length (flash-decoding): program (kv head h,
    split s) takes keys s·SPLIT … (s + 1)·SPLIT − 1 that are ≤ the last visible key, for the
    GROUP query heads of h at once, and leaves its unnormalised sum, running max and softmax
    denominator per query head for decode_attention_reduce_kernel."""
    kv_head = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    if LAST_IN_TENSOR:
        last = tl.load(last_ptr).to(tl.int64)
    else:
        last = last_key
    rows = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, HD)
    q = tl.load(q_ptr + (kv_head * GROUP + rows[:, None]) * HD + d[None, :], mask=rows[:, None] < GROUP, other=0.0)
    if INTERPRETED:  # the interpreter's tl.dot multiplies bf16's stored bits (uint16): the same values in float32
        q = q.to(tl.float32)
    # a finite start: a block with no visible key leaves it, and its weights, as they were
    m_i = tl.full((GROUP_PAD,), -1e30, tl.float32)
    l_i = tl.full((GROUP_PAD,), 0.0, tl.float32)
    acc = tl.full((GROUP_PAD, HD), 0.0, tl.float32)
    head_base = kv_head * cache_len * HD
    for block in range(SPLIT // BLOCK_N):  # a constant trip count: the interpreter takes no tensor bound
        keys = split * SPLIT + block * BLOCK_N + tl.arange(0, BLOCK_N)
        visible = keys <= last
        offsets = head_base + keys[:, None].to(tl.int64) * HD + d[None, :]
        k = tl.load(k_ptr + offsets, mask=visible[:, None], other=0.0)
        if INTERPRETED:
            k = k.to(tl.float32)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = tl.where(visible[None, :], s * scale, float("-inf"))
        if INTERPRETED:  # tl.max and tl.sum are jitted helpers: see add_rms_norm_kernel
            block_max = tl.reduce(s, 1, tl.standard._elementwise_max)
        else:
            block_max = tl.max(s, axis=1)
        m_new = tl.maximum(m_i, block_max)
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        if INTERPRETED:
            l_i = l_i * alpha + tl.reduce(p, 1, tl.standard._sum_combine)
        else:
            l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_ptr + offsets, mask=visible[:, None], other=0.0)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        elif INTERPRETED:  # p rounded to the cache's dtype, as the compiled dot takes it
            acc = acc * alpha[:, None] + tl.dot(p.to(v_ptr.dtype.element_ty).to(tl.float32), v.to(tl.float32))
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    part = (kv_head * tl.num_programs(1) + split) * GROUP_PAD + rows
    tl.store(acc_ptr + part[:, None] * HD + d[None, :], acc)
    tl.store(ml_ptr + part * 2, m_i)
    tl.store(ml_ptr + part * 2 + 1, l_i)


def decode_attention_reduce_kernel(
    acc_ptr, ml_ptr, out_ptr, splits,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HD: tl.constexpr, SPLITS_PAD: tl.constexpr, INTERPRETED: tl.constexpr,
):  # fmt: skip
    """Program (kv head h, query head g of its group): the splits' partial sums combined,
    softmax-weighted by their maxima, into out [h·GROUP + g, HD]."""
    kv_head = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1)
    sp = tl.arange(0, SPLITS_PAD)
    held = sp < splits
    part = (kv_head * splits + sp) * GROUP_PAD + g
    m = tl.load(ml_ptr + part * 2, mask=held, other=-1e30)
    l = tl.load(ml_ptr + part * 2 + 1, mask=held, other=0.0)
    if INTERPRETED:
        top = tl.reduce(m, 0, tl.standard._elementwise_max)
    else:
        top = tl.max(m, axis=0)
    w = tl.exp(m - top)  # key 0 is always visible: some split holds a real maximum
    d = tl.arange(0, HD)
    acc = tl.load(acc_ptr + part[:, None] * HD + d[None, :], mask=held[:, None], other=0.0)
    weighted = acc * w[:, None]
    if INTERPRETED:
        total = tl.reduce(weighted, 0, tl.standard._sum_combine)
        denominator = tl.reduce(w * l, 0, tl.standard._sum_combine)
    else:
        total = tl.sum(weighted, axis=0)
        denominator = tl.sum(w * l, axis=0)
    tl.store(out_ptr + (kv_head * GROUP + g) * HD + d, (total / denominator).to(out_ptr.dtype.element_ty))
