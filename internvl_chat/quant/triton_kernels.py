"""Our Triton kernels for 4-bit weights: the triton backend's GEMV (quant/triton_gemv.py: layout,
launch, operator) and the dequantization of prefill-sized batches (quant/triton_dequant.py). Those
modules import this one only when used, and decorate these functions there: with `triton.jit` for
CUDA tensors, as interpreted functions for CPU tensors (tests)."""

from __future__ import annotations

import triton.language as tl


def awq_gemv_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, out_ptr, part_ptr,
    M, N, G, magic,
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
        # Nibble j of a half word (bits 4j..4j+3, j < 4) OR-ed into the mantissa of 2^23 (`magic`,
        # its bits, in a register so that mask and OR are one LOP3) reads as 2^23 + q·16^j; less
        # 2^23 + z·16^j that is exactly (q − z)·16^j, and x·16^-j (exact) undoes the 16^j. No shift
        # per nibble: one per word, for the high half.
        z = tl.load(z_ptr + group_at, mask=tile_ok, other=0).to(tl.float32)
        zero0 = (z + 8388608.0)[:, :, None]
        zero1 = (z * 16.0 + 8388608.0)[:, :, None]
        zero2 = (z * 256.0 + 8388608.0)[:, :, None]
        zero3 = (z * 4096.0 + 8388608.0)[:, :, None]
        high = words >> 16  # arithmetic, but only bits 0..15 are used
        part = tl.full((BLOCK_N, BLOCK_G, GROUP_WORDS), 0.0, tl.float32)
        for i in tl.static_range(8):
            # nibble slot i of word w holds input g·group + i·(group/8) + w: x[k] is contiguous in w
            k = g[:, None] * (GROUP_WORDS * 8) + i * GROUP_WORDS + w_lane[None, :]
            xi = tl.load(x_row + k, mask=g_ok[:, None], other=0.0).to(tl.float32) * (1.0 / 16 ** (i % 4))
            if i < 4:
                bits = (words & (0xF << (4 * i))) | magic
            else:
                bits = (high & (0xF << (4 * (i - 4)))) | magic
            if i % 4 == 0:
                w = bits.to(tl.float32, bitcast=True) - zero0
            elif i % 4 == 1:
                w = bits.to(tl.float32, bitcast=True) - zero1
            elif i % 4 == 2:
                w = bits.to(tl.float32, bitcast=True) - zero2
            else:
                w = bits.to(tl.float32, bitcast=True) - zero3
            if INTERPRETED:  # triton 3.6's interpreter has no fma
                part += w * xi[None, :, :]
            else:  # fused whatever TRITON_DEFAULT_FP_FUSION says (Triton 3.10 stops fusing by default)
                part = tl.fma(w, xi[None, :, :], part)
        # the group's scale: one multiply-add per word, not per weight
        if INTERPRETED:
            acc += part * scale[:, :, None]
        else:
            acc = tl.fma(part, scale[:, :, None], acc)
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


def awq_gemm_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, out_ptr, M, N, G,
    GROUP_WORDS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr,
    STEPS: tl.constexpr, HAS_BIAS: tl.constexpr, INTERPRETED: tl.constexpr,
):  # fmt: skip
    """Program (block of BLOCK_M rows, block of BLOCK_N outputs): x[rows] · W[:, outputs] with tensor
    cores, for batches too large for the GEMV and too small to pay for a dense weight (a follow-up
    turn's prefill). Each step dequantizes a [BLOCK_N, BLOCK_G·g] tile of the repacked layout in
    registers — read once at 0.5 B/weight per row block — and multiplies it in x's dtype (fp32: in
    full fp32, no TF32), accumulating in fp32."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    group_size: tl.constexpr = GROUP_WORDS * 8
    step_k: tl.constexpr = BLOCK_G * group_size
    g_lane = tl.arange(0, BLOCK_G)
    w_lane = tl.arange(0, GROUP_WORDS)
    slots = tl.arange(0, 8)
    k_lane = tl.arange(0, step_k)
    in_features = G * group_size
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for step in range(STEPS):  # STEPS = ⌈G / BLOCK_G⌉, constant (see the GEMV's loop)
        g0 = step * BLOCK_G
        g = g0 + g_lane
        g_ok = g < G
        # the mask is constant along each group's inputs, so the loads can be vectorized
        k_ok = (g0 + k_lane // group_size) < G
        x = tl.load(x_ptr + rows[:, None] * in_features + g0 * group_size + k_lane[None, :],
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)  # fmt: skip
        tile_ok = col_ok[:, None] & g_ok[None, :]
        word_at = cols[:, None, None] * (G * GROUP_WORDS) + g[None, :, None] * GROUP_WORDS + w_lane[None, None, :]
        words = tl.load(w_ptr + word_at, mask=tile_ok[:, :, None], other=0)  # [BLOCK_N, BLOCK_G, g/8]
        scale = tl.load(s_ptr + cols[:, None] * G + g[None, :], mask=tile_ok, other=0.0).to(tl.float32)
        zero = tl.load(z_ptr + cols[:, None] * G + g[None, :], mask=tile_ok, other=0).to(tl.float32)
        # slot i of word w is input i·(g/8) + w of its group: [N, G, 8, g/8] flattens to input order
        q = ((words[:, :, None, :] >> (4 * slots)[None, None, :, None]) & 0xF).to(tl.float32)
        w = (q - zero[:, :, None, None]) * scale[:, :, None, None]
        w = tl.reshape(w, (BLOCK_N, step_k))
        if INTERPRETED:
            acc += tl.dot(x.to(tl.float32), tl.trans(w))
        elif x_ptr.dtype.element_ty == tl.float32:
            acc = tl.dot(x, tl.trans(w), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, tl.trans(w.to(x_ptr.dtype.element_ty)), acc)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rows[:, None] * N + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


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


# ---------------------------------------------------------------------------------------------
# Dequantization for prefill-sized batches (quant/triton_dequant.py): one pass that reads the
# resident int4 layout (0.5 B/weight) and writes the dense weight, instead of torch's chain of
# unpack, shift, mask and multiply-add kernels (each a full pass over a byte or more per weight).


def dequant_tinygemm_kernel(
    w_ptr, sz_ptr, out_ptr, N, K, K_OUTER,
    HALF_TILES: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr,
):  # fmt: skip
    """Program (n block, block of BLOCK_W words per row): the tinygemm CUDA weight int32
    [N/8, K/(16t), 32, t/2] → out [N, K] = (q − 8)·s + z, each 16t-wide k-block in block order
    (nibble p of a row's chunk at column p; quant/int4_linear.py). sz_ptr: (scale, zero) [G, N, 2]."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    words = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)  # a row's words, 8 columns each
    chunk = 4 * HALF_TILES  # the words of one row's k-block; rows 8j..8j+7 of a block are adjacent
    ok = (rows < N)[:, None] & (words < K // 8)[None, :]
    word_at = (
        ((rows // 8)[:, None] * K_OUTER + (words // chunk)[None, :]) * (32 * HALF_TILES)
        + (rows % 8)[:, None] * chunk
        + (words % chunk)[None, :]
    )
    packed = tl.load(w_ptr + word_at, mask=ok, other=0)
    # a k-block lies inside one group, so a word's 8 nibbles share (scale, zero)
    pair_at = ((words * 8 // GROUP)[None, :] * N + rows[:, None]) * 2
    scale = tl.load(sz_ptr + pair_at, mask=ok, other=0.0).to(tl.float32)
    zero = tl.load(sz_ptr + pair_at + 1, mask=ok, other=0.0).to(tl.float32)
    slots = tl.arange(0, 8)
    q = ((packed[:, :, None] >> (4 * slots)[None, None, :]) & 0xF).to(tl.float32)  # [BLOCK_N, BLOCK_W, 8]
    # (q − 8)·s is exact in fp32 (a 4-bit integer times a bf16); + z rounds once, the store once more
    w = (q - 8.0) * scale[:, :, None] + zero[:, :, None]
    out_at = rows[:, None, None] * K + (words[:, None] * 8 + slots[None, :])[None, :, :]
    tl.store(out_ptr + out_at, w.to(out_ptr.dtype.element_ty), mask=ok[:, :, None])


def dequant_repacked_kernel(
    w_ptr, s_ptr, z_ptr, out_ptr, N, G,
    GROUP_WORDS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr,
):  # fmt: skip
    """Program (n block, block of BLOCK_G groups): the triton backend's int32 [N, K/8]
    (quant/triton_gemv.py: in each group, slot i of word w holds k = i·(g/8) + w) → out [N, K] =
    (q − z)·s in input order: dequantize_awq's values."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    groups = tl.program_id(1) * BLOCK_G + tl.arange(0, BLOCK_G)
    w_lane = tl.arange(0, GROUP_WORDS)
    slots = tl.arange(0, 8)
    group_size = GROUP_WORDS * 8
    ok = (rows < N)[:, None] & (groups < G)[None, :]  # [BLOCK_N, BLOCK_G]
    word_at = rows[:, None, None] * (G * GROUP_WORDS) + groups[None, :, None] * GROUP_WORDS + w_lane[None, None, :]
    packed = tl.load(w_ptr + word_at, mask=ok[:, :, None], other=0)  # [BLOCK_N, BLOCK_G, GROUP_WORDS]
    scale = tl.load(s_ptr + rows[:, None] * G + groups[None, :], mask=ok, other=0.0).to(tl.float32)
    zero = tl.load(z_ptr + rows[:, None] * G + groups[None, :], mask=ok, other=0).to(tl.float32)
    # [BLOCK_N, BLOCK_G, 8 slots, GROUP_WORDS]: along the words the inputs are consecutive, so the
    # last axis is the contiguous one in the output and the stores are wide
    q = ((packed[:, :, None, :] >> (4 * slots)[None, None, :, None]) & 0xF).to(tl.float32)
    w = (q - zero[:, :, None, None]) * scale[:, :, None, None]  # exact in fp32: only the store rounds
    k = groups[:, None, None] * group_size + slots[None, :, None] * GROUP_WORDS + w_lane[None, None, :]
    out_at = rows[:, None, None, None] * (G * group_size) + k[None, :, :, :]
    tl.store(out_ptr + out_at, w.to(out_ptr.dtype.element_ty), mask=ok[:, :, None, None])
