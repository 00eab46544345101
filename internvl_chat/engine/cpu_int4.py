"""The layout of our AVX2 int4 GEMV (csrc/gemv_int4_avx2.h), made once from an Int4Linear.

The kernel reads, per output row and group of g columns, the group's 4-bit values (g/2 bytes, in
blocks of 32 that its registers unpack without shifts) followed by a float32 scale s and offset m,
W[n, k] = q·s + m: one uint8 tensor [N, K/g · (g/2 + 8)], each row one sequential stream. From
what the layer holds:
- backend "dequant" (the AWQ tensors): q, z and s exactly, m = −z·s (exact in float32).
- backend "torch" on a CPU (PyTorch's int4 kernel, "tinygemm"): its packed weight (a layout
  that depends on the CPU PyTorch runs on, so the nibble order is found by packing probes of the
  same shape) and its bf16 (scale, zero) pairs, W = (q − 8)·scale + zero, so m = zero − 8·scale.
  That kernel also takes x and gives y in bf16; `rounds_to_bf16` tells the C++ step to do the same.
The copy costs 0.5 B/weight plus 8 bytes per group and row (0.5625 B/weight at g = 128), on top of
the layer's own tensors.
"""

from __future__ import annotations

import torch

from internvl_chat.quant.awq_format import unpack_awq
from internvl_chat.quant.int4_linear import Int4Linear

BLOCK = 32  # weights per 16-byte block of the kernel's layout; g must be a multiple


def unsupported(m: Int4Linear) -> str | None:
    """None when the C++ kernel can run this layer, else why not."""
    if m.backend not in ("torch", "dequant"):
        return f"int4 backend {m.backend!r}"
    if any(t.device.type != "cpu" for t in m.buffers()):
        return "int4 weights not on the CPU"
    if m.group_size % BLOCK != 0:
        return f"int4 group size {m.group_size} (the C++ step needs a multiple of {BLOCK})"
    return None


def rounds_to_bf16(m: Int4Linear) -> bool:
    """Whether the layer's own kernel rounds its input and output to bf16 (tinygemm does)."""
    return m.backend == "torch"


def pack(q: torch.Tensor) -> torch.Tensor:
    """4-bit values q [N, K] (0..15) → uint8 [N, K/2] in the kernel's layout: in each block of 32,
    byte c of word w holds k = 8c + w (low nibble) and 8c + 4 + w (high nibble)."""
    n, k = q.shape
    by_c = q.to(torch.uint8).reshape(n, k // BLOCK, 4, 2, 4)  # [n, block, c, half, w]
    pairs = by_c[:, :, :, 0] | (by_c[:, :, :, 1] << 4)  # [n, block, c, w]
    return pairs.transpose(2, 3).contiguous().reshape(n, k // 2)


def layout(q: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """The kernel's tensor from q [N, K] (0..15) and float32 scales and offsets [N, K/g]."""
    n, groups = scales.shape
    packed = pack(q).reshape(n, groups, -1)
    pairs = torch.stack((scales.float(), offsets.float()), dim=-1).contiguous().view(torch.uint8)  # [N, G, 8]
    return torch.cat((packed, pairs), dim=-1).reshape(n, -1)


def tensor(m: Int4Linear, orders: dict | None = None) -> torch.Tensor:
    """The layer's weight in the kernel's layout. `orders` caches tinygemm's nibble order per
    shape across the layers of one model."""
    return layout(*values(m, orders))


def values(m: Int4Linear, orders: dict | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q [N, K] uint8, scales [N, G] float32, offsets [N, G] float32) of the weight the layer computes with."""
    if m.backend == "dequant":
        q = unpack_awq(m.qweight, torch.uint8).t()
        s = m.scales.float().t()
        offsets = -unpack_awq(m.qzeros, torch.uint8).t().float() * s
    else:
        q = _tinygemm_cpu_values(m.packed_weight, m.out_features, m.in_features, {} if orders is None else orders)
        s = m.scale_and_zero[..., 0].float().t()
        offsets = m.scale_and_zero[..., 1].float().t() - 8 * s
    return q, s.contiguous(), offsets.contiguous()


def _tinygemm_cpu_values(packed: torch.Tensor, n: int, k: int, orders: dict) -> torch.Tensor:
    """q [N, K] from PyTorch's CPU int4 packing of it."""
    if packed.dtype != torch.uint8 or packed.numel() * 2 != n * k:
        raise RuntimeError(f"an unknown layout of PyTorch's CPU int4 weight ({packed.dtype} {tuple(packed.shape)})")
    if (n, k) not in orders:
        orders[(n, k)] = _tinygemm_cpu_order(n, k)
    q = torch.empty(n * k, dtype=torch.uint8)
    q[orders[(n, k)]] = _nibbles(packed)
    return q.reshape(n, k)


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    flat = packed.reshape(-1)
    return torch.stack((flat & 0xF, flat >> 4), dim=-1).reshape(-1)


def _tinygemm_cpu_order(n: int, k: int) -> torch.Tensor:
    """order[p] = the flat index n·K + k of the value that nibble p of the packed weight holds:
    the packing is a fixed permutation per shape, read off by packing each 4 bits of the index.
    int32 throughout (a linear has < 2^31 weights): ~13 bytes per weight while it runs."""
    if n * k >= 2**31:
        raise RuntimeError(f"a {n}×{k} int4 weight is too large for the C++ step")
    index = torch.arange(n * k, dtype=torch.int32)
    order = torch.zeros(n * k, dtype=torch.int32)
    for shift in range(0, max(1, (n * k - 1).bit_length()), 4):
        probe = ((index >> shift) & 0xF).reshape(n, k)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(probe, 1)
        order |= _nibbles(packed).to(torch.int32) << shift
    del index, probe
    if order.max() >= n * k or not torch.bincount(order, minlength=n * k).eq(1).all():
        raise RuntimeError("PyTorch's CPU int4 packing is not a permutation of the weight here")
    return order
