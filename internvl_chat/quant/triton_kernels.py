"""The Triton kernels of the triton int4 backend; quant/triton_gemv.py (layout, launch, operator)
imports this module only when the backend is used, and decorates these functions there: with
`triton.jit` for CUDA tensors, as interpreted functions for CPU tensors (tests)."""

from __future__ import annotations

import triton.language as tl


def awq_gemv_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, out_ptr, part_ptr,
    M, N, G,
    GROUP_WORDS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr, STEPS: tl.constexpr,
    HAS_BIAS: tl.constexpr, FINAL: tl.constexpr, INTERPRETED: tl.constexpr,
):  # fmt: skip
    """Program (m, n block, k split): x[m] · W[:, rows] over the split's STEPS·BLOCK_G groups, in fp32."""
    m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    g_lane = tl.arange(0, BLOCK_G)
    w_lane = tl.arange(0, GROUP_WORDS)
    words_per_row = G * GROUP_WORDS
    g_begin = pid_k * (STEPS * BLOCK_G)
    x_row = x_ptr + m * (words_per_row * 8)
    acc = tl.full((BLOCK_N, BLOCK_G, GROUP_WORDS), 0.0, tl.float32)  # tl.zeros is a jitted helper (see below)
    for step in range(STEPS):  # a constant trip count (a tensor bound breaks triton 3.6's interpreter)
        g = g_begin + step * BLOCK_G + g_lane
        g_ok = g < G
        tile_ok = row_ok[:, None] & g_ok[None, :]
        # [BLOCK_N, BLOCK_G, g/8] words: each output row's BLOCK_G·g/8 words are contiguous
        word_at = rows[:, None, None] * words_per_row + g[None, :, None] * GROUP_WORDS + w_lane[None, None, :]
        # masks constant along the words (broadcast by tl.load), so the loads can be vectorized
        words = tl.load(w_ptr + word_at, mask=tile_ok[:, :, None], other=0)
        group_at = rows[:, None] * G + g[None, :]
        scale = tl.load(s_ptr + group_at, mask=tile_ok, other=0.0).to(tl.float32)
        # 2^23 + z: subtracted from 2^23 + q (below), exactly q − z
        zero = tl.load(z_ptr + group_at, mask=tile_ok, other=0).to(tl.float32) + 8388608.0
        part = tl.full((BLOCK_N, BLOCK_G, GROUP_WORDS), 0.0, tl.float32)
        for i in tl.static_range(8):
            # nibble slot i of word w holds input g·group + i·(group/8) + w: x[k] is contiguous in w
            k = g[:, None] * (GROUP_WORDS * 8) + i * GROUP_WORDS + w_lane[None, :]
            xi = tl.load(x_row + k, mask=g_ok[:, None], other=0.0).to(tl.float32)
            q = ((words >> (4 * i)) & 0xF) | 0x4B000000  # the fp32 bits of 2^23 + q
            part += (q.to(tl.float32, bitcast=True) - zero[:, :, None]) * xi[None, :, :]
        acc += part * scale[:, :, None]  # one multiply per word for the group's scale
    if INTERPRETED:
        # tl.sum is a jitted helper, compiled or interpreted as TRITON_INTERPRET said when triton
        # was imported; the interpreter runs a reduce with the standard sum combiner as np.sum.
        y = tl.reduce(tl.reduce(acc, 2, tl.standard._sum_combine), 1, tl.standard._sum_combine)
    else:
        y = tl.sum(tl.sum(acc, axis=2), axis=1)
    if FINAL:  # no split: this program has the whole sum
        if HAS_BIAS:
            y += tl.load(b_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + m * N + rows, y.to(out_ptr.dtype.element_ty), mask=row_ok)
    else:
        tl.store(part_ptr + (pid_k * M + m) * N + rows, y, mask=row_ok)


def reduce_partials_kernel(part_ptr, b_ptr, out_ptr, M, N, SPLITS: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    """out[m, cols] = Σ_s part[s, m, cols] (+ bias), in a fixed order: the same bits on every run."""
    m = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < N
    y = tl.full((BLOCK,), 0.0, tl.float32)
    for s in tl.static_range(SPLITS):
        y += tl.load(part_ptr + (s * M + m) * N + cols, mask=ok, other=0.0)
    if HAS_BIAS:
        y += tl.load(b_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + m * N + cols, y.to(out_ptr.dtype.element_ty), mask=ok)
