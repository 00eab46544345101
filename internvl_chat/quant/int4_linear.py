"""`Int4Linear`: a 4-bit AWQ linear layer with a choice of kernels (SPEC §5).

Backends:
- "torch": PyTorch's built-in int4 weight-only GEMM ("tinygemm"). Resident: the kernel's packed
  weight (0.5 B/weight) and one bf16 (scale, zero) pair per group and column. Tinygemm computes
  w = (q − 8)·scale + zero, so an AWQ zero z maps exactly to zero = (8 − z)·scale. Activations go
  through the kernel in bf16 (cast in and out). On CUDA, batches above `dense_threshold` rows
  dequantize the packed weight on the fly and use a dense matmul (tinygemm is slow there); the
  dequantization is one Triton kernel where Triton runs (quant/triton_dequant.py), else torch ops.
- "dequant": keeps the AWQ tensors, dequantizes on every call and runs a dense matmul. Any device
  and dtype; the reference.
- "triton": our Triton split-K GEMV (quant/triton_gemv.py) on a layout repacked for it (0.52 B/weight
  for g = 128), for batches of up to `gemv_max_rows` rows in any float dtype; then our tensor-core
  GEMM on the same layout up to `gemm_max_rows`; larger batches dequantize that layout (one Triton
  kernel) and run a dense matmul. CUDA (CPU only in Triton's interpreter, for tests);
  asked for where it cannot run, a UsageError says why.
- "gemlite": GemLite's Triton GEMV (optional `pip install gemlite`; CUDA only), exact AWQ (q − z)·s;
  batches above `gemlite_max_rows` rows use a dense matmul. See quant/gemlite_backend.py.
- "auto": "torch" where `int4_backend_supported`, else "dequant" (never "triton" or "gemlite" until
  they are measured against tinygemm on a GPU).

No forward path synchronises with the host: branches depend on shapes only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from internvl_chat.errors import UsageError
from internvl_chat.quant import gemlite_backend, triton_dequant, triton_gemv
from internvl_chat.quant.awq_format import dequantize_awq, unpack_awq, validate_awq

BACKENDS = ("auto", "torch", "dequant", "triton", "gemlite")
TINYGEMM_GROUP_SIZES = (32, 64, 128, 256)
_TILE_K = 16  # tinygemm's k-tile; the CUDA packing holds `inner_k_tiles` of them per int32 group
_TILE_N = 8

__all__ = ["BACKENDS", "Int4Linear", "int4_backend_supported"]


# ---------------------------------------------------------------------------------------------
# Kernel availability


def _cuda_inner_k_tiles(group_size: int) -> int:
    """Inner k-tiles (2, 4 or 8) for the CUDA packing: 16·t ≤ group size, so that every packed
    k-block lies inside one quantization group (the dense path relies on it)."""
    return max(2, min(8, group_size // _TILE_K))


def int4_backend_supported(device: torch.device | str, in_features: int, out_features: int, group_size: int) -> bool:
    """Whether PyTorch's int4 kernels can run a K×N linear with this group size on `device`."""
    device = torch.device(device)
    if group_size not in TINYGEMM_GROUP_SIZES or in_features % group_size != 0:
        return False
    if device.type == "cuda":
        # ROCm builds use another packed layout (16-wide n tiles), which our dense path cannot read.
        if torch.version.hip is not None or not torch.cuda.is_available():
            return False
        if torch.cuda.get_device_capability(device) < (8, 0):
            return False
        return out_features % _TILE_N == 0 and in_features % (_TILE_K * _cuda_inner_k_tiles(group_size)) == 0
    if device.type == "cpu":
        has_ops = hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and hasattr(
            torch.ops.aten, "_convert_weight_to_int4pack_for_cpu"
        )
        return has_ops and out_features % 16 == 0 and in_features % 2 == 0
    return False


# ---------------------------------------------------------------------------------------------
# Tinygemm CUDA layout
#
# `_convert_weight_to_int4pack(uint8 [N, K/2], t)` (byte = q[n, 2i] << 4 | q[n, 2i+1]) returns int32
# [N/8, K/(16t), 32, t/2]. Element [nt, ko, lane, i2], nibble slot j = 4h + jj (bits 4j..4j+3) holds
#   n = 8·nt + lane // 4,   k = 16t·ko + 32·i2 + 8·jj + 2·(lane % 4) + h
# (read off `matrix_to_m16n8k16_Bint4_layout` in PyTorch's int4mm.cu; checked on a GPU by the tests).


def _awq_to_tinygemm_bytes(q_in_out: torch.Tensor) -> torch.Tensor:
    """4-bit values [K, N] → the uint8 [N, K/2] input of `_convert_weight_to_int4pack`."""
    q = q_in_out.t().to(torch.uint8)
    return ((q[:, 0::2] << 4) | q[:, 1::2]).contiguous()


# The fast dense path needs no nibble shuffle back to k order. For one n, the 4·(t/2) words of lanes
# 4·lane_hi .. +3 are contiguous and hold the whole 16t-wide k-block, so copying those chunks
# (0.5 B/weight) gives rows n in order with each k-block's nibbles in a fixed scrambled order.
# The weight is dequantized in that order and the activations' columns are permuted to match.


def tinygemm_cuda_block_order(inner_k_tiles: int) -> torch.Tensor:
    """order[p] = the k (within a 16t block) held by nibble p of a row's chunk (p = 8·word + slot)."""
    half = inner_k_tiles // 2
    order = torch.empty(16 * inner_k_tiles, dtype=torch.long)
    for lane_lo in range(4):
        for i2 in range(half):
            word = lane_lo * half + i2
            for slot in range(8):
                h, jj = divmod(slot, 4)
                order[8 * word + slot] = 32 * i2 + 8 * jj + 2 * lane_lo + h
    return order


def tinygemm_cuda_rows(packed: torch.Tensor) -> torch.Tensor:
    """Packed int32 [N/8, K/(16t), 32, t/2] → uint8 nibbles [N, K], each row in block order."""
    n_tiles, k_outer, lanes, half_tiles = packed.shape
    chunks = packed.reshape(n_tiles, k_outer, lanes // 4, 4 * half_tiles).permute(0, 2, 1, 3).contiguous()
    as_bytes = chunks.view(torch.uint8).reshape(n_tiles * _TILE_N, -1, 1)
    shifts = torch.arange(0, 8, 4, dtype=torch.uint8, device=packed.device)  # a kernel, not a host copy
    return ((as_bytes >> shifts) & 0xF).reshape(n_tiles * _TILE_N, -1)


def dense_weight_block_order(
    packed: torch.Tensor, scale_and_zero: torch.Tensor, group_size: int, dtype: torch.dtype, use_kernel: bool = True
) -> torch.Tensor:
    """The tinygemm CUDA weight as dense [N, K] of `dtype`, each k-block in block order: one
    Triton kernel where it can run (quant/triton_dequant.py) unless `use_kernel` is false, else torch ops."""
    if use_kernel and triton_dequant.can_run(packed):
        return triton_dequant.dequantize_tinygemm(packed, scale_and_zero, group_size, dtype)
    return dense_weight_block_order_torch(packed, scale_and_zero, group_size, dtype)


def dense_weight_block_order_torch(
    packed: torch.Tensor, scale_and_zero: torch.Tensor, group_size: int, dtype: torch.dtype
) -> torch.Tensor:
    """`dense_weight_block_order` in torch ops (~5 passes over the weight)."""
    q = tinygemm_cuda_rows(packed)
    out_features, in_features = q.shape
    groups = in_features // group_size
    # (q − 8)·s + z = q·s + (z − 8s); each block-ordered k-block stays inside its group.
    scale = scale_and_zero[:, :, 0].float()
    shifted_zero = scale_and_zero[:, :, 1].float() - 8 * scale
    # Contiguous [N, G, 1]: a transposed view here would make the output transposed (and slow).
    scale = scale.t().to(dtype).contiguous().unsqueeze(-1)
    shifted_zero = shifted_zero.t().to(dtype).contiguous().unsqueeze(-1)
    w = torch.addcmul(shifted_zero, q.reshape(out_features, groups, group_size), scale)
    return w.reshape(out_features, in_features)


def dense_from_tinygemm_cuda(
    x2: torch.Tensor,
    packed: torch.Tensor,
    scale_and_zero: torch.Tensor,
    group_size: int,
    block_order: torch.Tensor,
    use_kernel: bool = True,
) -> torch.Tensor:
    """x2 [M, K] @ W for a tinygemm CUDA weight, through a dense weight built on the fly (any device)."""
    rows, in_features = x2.shape
    w = dense_weight_block_order(packed, scale_and_zero, group_size, x2.dtype, use_kernel)
    block = block_order.numel()
    x_perm = x2.reshape(rows, in_features // block, block).index_select(2, block_order)
    return F.linear(x_perm.reshape(rows, in_features), w)


# ---------------------------------------------------------------------------------------------
# The layer


class Int4Linear(nn.Module):
    """y = x·W + b for a 4-bit AWQ weight W [K, N]; x [..., K] → [..., N] in x's dtype.

    Build with `Int4Linear.from_awq(...)` on the device it will run on: the torch backend's packed
    weight is device-specific (buffers are not saved in state dicts).
    """

    # Rows above which the CUDA torch backend dequantizes and runs a dense matmul. tinygemm grows
    # linearly with rows; the dense path costs about the same at any row count up to a few hundred
    # (one dequantization, then a bf16 matmul that is memory-bound: 11-12 µs at M = 1-128 for the
    # 8B qkv on an H200). With the one-pass Triton dequantization (H200, 2026-12-04, gemv section)
    # the 8B qkv cost 49 µs dense against tinygemm's 30 µs at 16 rows and 154 µs at 128: crossing
    # near 33 rows, and near 38-40 for the 8B o/gate_up/down by the same measured slopes. 64 keeps
    # clear of the small (1B) layers, whose kernel calls cost a few µs either way. (With the
    # torch-ops dequantization, 3.6× slower, an H100 measured 128-256.) Tune with the bench.
    dense_threshold: int = 64
    # Rows up to which the triton backend runs its GEMV (each row re-reads the weight tile from L2
    # and redoes the unpacking); above, the dense path. A guess until a GPU session measures it.
    gemv_max_rows: int = 16
    # Rows up to which it runs its tensor-core GEMM (a follow-up turn's prefill: the weight read
    # once per 64 rows, dequantized in registers; groups of at most 256, `triton_gemv.gemm_takes`);
    # above, the dense path. A guess, as above.
    gemm_max_rows: int = 128
    # Rows up to which the gemlite backend runs GemLite's GEMV kernel (GemLite's own limit for 4-bit);
    # above, a dense matmul. Tune with the bench.
    gemlite_max_rows: int = 4
    # Whether those dense paths dequantize with our Triton kernel where it runs (False: torch ops;
    # the bench's before/after).
    dequant_kernel: bool = True

    def __init__(self, in_features: int, out_features: int, group_size: int, backend: str) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.group_size = group_size
        self.backend = backend
        self.register_buffer("bias", None, persistent=False)

    @classmethod
    def from_awq(
        cls,
        qweight: torch.Tensor,
        qzeros: torch.Tensor,
        scales: torch.Tensor,
        bias: torch.Tensor | None = None,
        group_size: int = 128,
        backend: str = "auto",
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str | None = None,
    ) -> Int4Linear:
        """Build from the AWQ GEMM triple (qweight int32 [K, N/8], qzeros int32 [K/g, N/8], scales [K/g, N]).

        `dtype` is the bias's dtype (the activations' usual dtype); `device` defaults to qweight's.
        """
        in_features, out_features = validate_awq(qweight, qzeros, scales, group_size)
        device = torch.device(device) if device is not None else qweight.device
        if backend not in BACKENDS:
            raise UsageError(f"unknown int4 backend {backend!r}; choose one of {', '.join(BACKENDS)}.")
        supported = int4_backend_supported(device, in_features, out_features, group_size)
        if backend == "torch" and not supported:
            raise UsageError(
                f"PyTorch's int4 kernels cannot run a {in_features}→{out_features} linear with group size "
                f"{group_size} on {device} (needs CUDA sm80+ or CPU and aligned shapes); use int4 backend 'auto' or 'dequant'."
            )
        if backend == "triton":
            triton_gemv.check_usable(device, in_features, out_features, group_size)
            resolved = "triton"
        elif backend == "gemlite":
            reason = gemlite_backend.gemlite_unavailable_reason(device, in_features, group_size, dtype)
            if reason is not None:
                raise UsageError(f"int4 backend 'gemlite' cannot run here: {reason}; use int4 backend 'auto'.")
            resolved = "gemlite"
        else:
            resolved = "torch" if backend == "torch" or (backend == "auto" and supported) else "dequant"
        layer = cls(in_features, out_features, group_size, resolved)
        if resolved == "gemlite":
            gemlite_backend.init_gemlite(layer, qweight.to(device), qzeros.to(device), scales.to(device), dtype)
        elif resolved == "torch":
            layer._init_tinygemm(qweight.to(device), qzeros.to(device), scales.to(device))
        elif resolved == "triton":
            triton_gemv.ensure_registered()
            packed, scales_nk, zeros_nk = triton_gemv.repack_awq(qweight.to(device), qzeros.to(device), scales.to(device), group_size)
            layer.register_buffer("qweight", packed, persistent=False)  # [N, K/8], see triton_gemv
            layer.register_buffer("scales", scales_nk, persistent=False)  # [N, K/g]
            layer.register_buffer("zeros", zeros_nk, persistent=False)  # uint8 [N, K/g]
        else:
            layer.register_buffer("qweight", qweight.to(device).contiguous(), persistent=False)
            layer.register_buffer("qzeros", qzeros.to(device).contiguous(), persistent=False)
            layer.register_buffer("scales", scales.to(device).contiguous(), persistent=False)
        if bias is not None:
            if bias.shape != (out_features,):
                raise UsageError(f"bias has shape {tuple(bias.shape)} but the linear has {out_features} outputs.")
            layer.register_buffer("bias", bias.to(device=device, dtype=dtype).contiguous(), persistent=False)
        return layer

    def _init_tinygemm(self, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor) -> None:
        q = unpack_awq(qweight, torch.uint8)  # [K, N]
        zeros = unpack_awq(qzeros, torch.uint8).to(torch.float32)
        scales_f = scales.to(torch.float32)
        # Tinygemm: (q − 8)·s + zero', and AWQ: (q − z)·s  ⇒  zero' = (8 − z)·s.
        # The kernel rounds s to bf16 anyway; use that rounded s for zero' so both agree.
        scales_bf16 = scales_f.to(torch.bfloat16)
        tiny_zero = (8.0 - zeros) * scales_bf16.to(torch.float32)
        scale_and_zero = torch.stack((scales_bf16, tiny_zero.to(torch.bfloat16)), dim=-1).contiguous()
        if qweight.device.type == "cuda":
            tiles = _cuda_inner_k_tiles(self.group_size)
            packed = torch.ops.aten._convert_weight_to_int4pack(_awq_to_tinygemm_bytes(q), tiles)
            # 1 KB per layer: lets the dense path permute activations instead of the weight.
            self.register_buffer("block_order", tinygemm_cuda_block_order(tiles).to(q.device), persistent=False)
        else:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.t().to(torch.int32).contiguous(), 1)
        del q
        self.register_buffer("packed_weight", packed, persistent=False)
        self.register_buffer("scale_and_zero", scale_and_zero, persistent=False)

    # -- forward ---------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, bias = self.forward_leaving_bias(x)
        return y if bias is None else y + bias.to(y.dtype)

    def forward_leaving_bias(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`forward(x)` without the bias where adding it is a pass of its own: (y, that bias or
        None). A kernel that consumes y anyway adds it there (engine/fused.py's RoPE kernel)."""
        lead_shape = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if self.backend == "torch":
            y = self._forward_torch(x2)
        elif self.backend == "triton":
            rows = x2.shape[0]
            gemm = rows <= self.gemm_max_rows and triton_gemv.gemm_takes(self.group_size)
            if rows <= self.gemv_max_rows or gemm:  # the bias is added in the kernels, in fp32
                kernel = triton_gemv.awq_triton_gemv if rows <= self.gemv_max_rows else triton_gemv.awq_triton_gemm
                y = kernel(x2, self.qweight, self.scales, self.zeros, self.bias, self.group_size)
                return y.reshape(*lead_shape, self.out_features), None
            if self.dequant_kernel and triton_dequant.can_run(self.qweight):
                y = F.linear(x2, triton_dequant.dequantize_repacked(self.qweight, self.scales, self.zeros, self.group_size, x2.dtype))
            else:
                y = triton_gemv.dense_from_repacked(x2, self.qweight, self.scales, self.zeros, self.group_size)
        elif self.backend == "gemlite":
            if x2.shape[0] > self.gemlite_max_rows:
                y = gemlite_backend.gemlite_dense_matmul(self, x2)
            else:
                y = gemlite_backend.gemlite_matmul(self, x2)
        else:
            w = dequantize_awq(self.qweight, self.qzeros, self.scales, self.group_size, dtype=x.dtype)
            y = x2 @ w
        return y.reshape(*lead_shape, self.out_features), self.bias

    def _forward_torch(self, x2: torch.Tensor) -> torch.Tensor:
        rows = x2.shape[0]
        if rows == 0:
            return x2.new_empty(0, self.out_features)
        if self.packed_weight.device.type == "cuda":
            if rows > self.dense_threshold:
                return dense_from_tinygemm_cuda(
                    x2, self.packed_weight, self.scale_and_zero, self.group_size, self.block_order, self.dequant_kernel
                )
            xb = x2.to(torch.bfloat16).contiguous()
            y = torch.ops.aten._weight_int4pack_mm(xb, self.packed_weight, self.group_size, self.scale_and_zero)
        else:
            # On CPU dequantizing costs more than the kernel saves, so there is no dense path.
            xb = x2.to(torch.bfloat16).contiguous()
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(xb, self.packed_weight, self.group_size, self.scale_and_zero)
        return y.to(x2.dtype)

    def dequantized_weight_out_in(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight as a dense [N, K] tensor (nn.Linear layout), built from what is resident.

        For tests and tools; supported for the dequant, triton and gemlite backends and the CUDA torch backend.
        """
        if self.backend == "triton":
            return triton_gemv.dequantize_repacked(self.qweight, self.scales, self.zeros, self.group_size, dtype)
        if self.backend == "gemlite":
            return gemlite_backend.gemlite_dense_weight(self, dtype).t()
        if self.backend == "dequant":
            return dequantize_awq(self.qweight, self.qzeros, self.scales, self.group_size, dtype=dtype).t()
        if self.packed_weight.device.type != "cuda":
            raise UsageError("dequantizing the CPU tinygemm layout is not supported; use int4 backend 'dequant'.")
        w = dense_weight_block_order(self.packed_weight, self.scale_and_zero, self.group_size, dtype)
        block = self.block_order.numel()
        out = torch.empty_like(w)
        out.view(self.out_features, -1, block)[:, :, self.block_order] = w.view(self.out_features, -1, block)
        return out

    # -- reporting -------------------------------------------------------------------------------

    def memory_bytes(self) -> int:
        """Bytes resident on the device for this layer (weights, scales, zeros, bias)."""
        return sum(buf.numel() * buf.element_size() for buf in self.buffers(recurse=False))

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}, "
            f"backend={self.backend}, bias={self.bias is not None}"
        )
