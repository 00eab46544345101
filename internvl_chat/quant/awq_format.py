"""The AWQ "GEMM" 4-bit layout (SPEC §2): pack, unpack, dequantize, quantize, TinyChat v2 import.

Conventions used by every function here:
- K = in_features, N = out_features. AWQ tensors are **in×out**: `qweight` int32 [K, N/8],
  `qzeros` int32 [K/g, N/8], `scales` [K/g, N]; the dequantized weight W is [K, N] and y = x·W + b.
  (nn.Linear's weight is the transpose, [N, K]; functions that take that layout say `out_in`.)
- Nibble slot s (bits 4s..4s+3) of int32 column j holds column 8j + AWQ_ORDER[s].

Nothing here knows about models; errors are `CheckpointError` with one-line messages.
"""

from __future__ import annotations

import sys

import torch

from internvl_chat.errors import CheckpointError

AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]

# Packing and unpacking reinterpret int32 words as bytes.
assert sys.byteorder == "little", "the AWQ packing code assumes a little-endian machine"

SCALE_MIN = 1e-5  # the quantizer's floor on a group's scale (SPEC §2)
TINYCHAT_KSTRIDE = 64  # input columns per interleaved block

__all__ = [
    "AWQ_ORDER",
    "awq_shapes",
    "validate_awq",
    "pack_awq",
    "unpack_awq",
    "dequantize_awq",
    "quantize_rtn",
    "concat_awq",
    "pack_tinychat_v2_qweight",
    "unpack_tinychat_v2_qweight",
    "tinychat_v2_to_awq",
    "awq_to_tinychat_v2",
]


# ---------------------------------------------------------------------------------------------
# Validation


def _label(name: str) -> str:
    return f"{name}: " if name else ""


def awq_shapes(in_features: int, out_features: int, group_size: int) -> dict[str, tuple[int, int]]:
    """The expected shapes of `qweight`, `qzeros`, `scales` for a K×N linear."""
    return {
        "qweight": (in_features, out_features // 8),
        "qzeros": (in_features // group_size, out_features // 8),
        "scales": (in_features // group_size, out_features),
    }


def validate_awq(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    group_size: int = 128,
    name: str = "",
) -> tuple[int, int]:
    """Check an AWQ GEMM triple and return (K, N); raise `CheckpointError` on any mismatch."""
    where = _label(name)
    if qweight.dim() != 2 or qzeros.dim() != 2 or scales.dim() != 2:
        raise CheckpointError(
            f"{where}AWQ qweight, qzeros and scales must all be 2-D (got {tuple(qweight.shape)}, "
            f"{tuple(qzeros.shape)}, {tuple(scales.shape)}); re-export the checkpoint in the AWQ GEMM layout."
        )
    for label, tensor in (("qweight", qweight), ("qzeros", qzeros)):
        if tensor.dtype != torch.int32:
            raise CheckpointError(
                f"{where}AWQ {label} must be int32 (got {tensor.dtype}); "
                "re-export the checkpoint in the AWQ GEMM layout (version 'gemm')."
            )
    if not scales.is_floating_point():
        raise CheckpointError(
            f"{where}AWQ scales must be a float tensor (got {scales.dtype}); re-export the checkpoint."
        )
    if group_size <= 0:
        raise CheckpointError(f"{where}AWQ group size must be positive (got {group_size}); fix quantization_config.")
    outputs = scales.shape[1]  # scales are [K/g, N] whatever the group size
    if qweight.shape[0] * 8 == outputs and qweight.shape[1] * 8 != outputs:
        # [N/8, K]: out × in/8 as some exporters (and a `.t()` too many) store it; the group-size
        # advice below sent the user editing a quantization_config that was right
        raise CheckpointError(
            f"{where}AWQ qweight has shape {tuple(qweight.shape)}, out/8 × in for the {outputs} outputs its scales "
            f"{tuple(scales.shape)} give: it is stored transposed, not in AWQ's GEMM layout (in × out/8); "
            "re-export the checkpoint in the AWQ GEMM layout (version 'gemm')."
        )
    gptq_like = qweight.shape[0] * 8 == scales.shape[0] * group_size and tuple(qzeros.shape) == (scales.shape[0], outputs // 8)
    if qweight.shape[1] == outputs and qweight.shape[0] * 8 != outputs and gptq_like:
        # in/8 × out: packed along the input, as GPTQ packs; told "check group_size" as well
        raise CheckpointError(
            f"{where}AWQ qweight has shape {tuple(qweight.shape)}, a column for each of the {outputs} outputs its scales "
            f"{tuple(scales.shape)} give: it is packed along its input (GPTQ's layout), not in AWQ's GEMM layout "
            "(in × out/8); re-export the checkpoint in the AWQ GEMM layout (version 'gemm')."
        )
    in_features, out_features = qweight.shape[0], qweight.shape[1] * 8
    if in_features % group_size != 0:
        raise CheckpointError(
            f"{where}AWQ in_features {in_features} is not divisible by group size {group_size}; "
            "check group_size in quantization_config."
        )
    expected = awq_shapes(in_features, out_features, group_size)
    for label, tensor in (("qzeros", qzeros), ("scales", scales)):
        if tuple(tensor.shape) != expected[label]:
            raise CheckpointError(
                f"{where}AWQ {label} has shape {tuple(tensor.shape)} but K={in_features}, N={out_features} "
                f"with group size {group_size} needs {expected[label]}; check group_size in quantization_config."
            )
    return in_features, out_features


# ---------------------------------------------------------------------------------------------
# Packing


def pack_awq(q: torch.Tensor) -> torch.Tensor:
    """Pack 4-bit values q [R, N] (0..15, any integer dtype) into int32 [R, N/8] (AWQ order).

    Works for both qweight (R = K) and qzeros (R = K/g).
    """
    if q.dim() != 2 or q.shape[1] % 8 != 0:
        raise CheckpointError(f"cannot pack a {tuple(q.shape)} tensor into AWQ int32 words; N must be a multiple of 8.")
    rows, cols = q.shape
    # Column 2i + e of a group of 8 goes to slot 4e + i (that is AWQ_ORDER): a 4×2 → 2×4 transpose.
    by_slot = (q.reshape(rows, cols // 8, 4, 2).transpose(2, 3).reshape(rows, cols // 8, 8) & 0xF).to(torch.uint8)
    # Byte b of a little-endian int32 holds slots 2b (low nibble) and 2b + 1 (high nibble).
    as_bytes = by_slot[:, :, 0::2] | (by_slot[:, :, 1::2] << 4)
    return as_bytes.contiguous().view(torch.int32).reshape(rows, cols // 8)


def _unpack_nibbles_u8(packed: torch.Tensor) -> torch.Tensor:
    """int32 [R, C] → uint8 [R, C, 8]: nibble slot s of every word (s = 0 is the low nibble)."""
    # Viewing as bytes keeps the transient at 1 byte per weight (little-endian: byte b = bits 8b..8b+7).
    as_bytes = packed.contiguous().view(torch.uint8).reshape(*packed.shape, 4)
    low = as_bytes & 0xF
    high = as_bytes >> 4
    return torch.stack((low, high), dim=-1).reshape(*packed.shape, 8)


def unpack_awq(packed: torch.Tensor, dtype: torch.dtype = torch.int32) -> torch.Tensor:
    """Unpack AWQ int32 [R, N/8] into 4-bit values [R, N] (0..15) of `dtype`."""
    if packed.dtype != torch.int32 or packed.dim() != 2:
        raise CheckpointError(f"expected a 2-D int32 AWQ tensor, got {packed.dtype} {tuple(packed.shape)}.")
    rows, words = packed.shape
    # Slot 4e + i holds column 2i + e (AWQ_ORDER); reshapes only, so no index tensor is built.
    by_column = _unpack_nibbles_u8(packed).reshape(rows, words, 2, 4).transpose(2, 3)
    return by_column.reshape(rows, words * 8).to(dtype)


def dequantize_awq(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    group_size: int = 128,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """W [K, N] (in×out) with W[k, n] = (q[k, n] − z[k/g, n]) · s[k/g, n].

    Computed in float32 (exact for fp16/bf16 scales times 4-bit integers), then cast to `dtype`.
    """
    in_features, out_features = validate_awq(qweight, qzeros, scales, group_size)
    groups = in_features // group_size
    q = unpack_awq(qweight, torch.uint8).reshape(groups, group_size, out_features)
    z = unpack_awq(qzeros, torch.uint8).to(torch.float32).unsqueeze(1)
    s = scales.to(torch.float32).unsqueeze(1)
    w = (q.to(torch.float32) - z) * s
    return w.reshape(in_features, out_features).to(dtype)


# ---------------------------------------------------------------------------------------------
# Quantizer


def quantize_rtn(
    w_in_out: torch.Tensor,
    group_size: int = 128,
    clip_max: torch.Tensor | None = None,
    clip_min: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest 4-bit quantization of an in×out weight W [K, N] → (qweight, qzeros, scales).

    Per group of `group_size` rows along K and per output column: scale = (max − min)/15 (≥ 1e-5),
    zero = clamp(−round(min/scale), 0, 15), q = clamp(round(w/scale) + zero, 0, 15).
    `clip_max` / `clip_min` [K/g, N] replace the group max / min (AWQ's clipping search).
    The fp16-rounded scale is used for zero and q, so dequantization matches what was stored.
    (Give an nn.Linear weight [N, K] as `weight.t()`.)
    """
    if w_in_out.dim() != 2:
        raise CheckpointError(f"quantize_rtn needs a 2-D in×out weight, got shape {tuple(w_in_out.shape)}.")
    in_features, out_features = w_in_out.shape
    if in_features % group_size != 0 or out_features % 8 != 0:
        raise CheckpointError(
            f"cannot quantize a {in_features}×{out_features} weight with group size {group_size}: "
            "in_features must be divisible by the group size and out_features by 8."
        )
    groups = in_features // group_size
    w = w_in_out.to(torch.float32).reshape(groups, group_size, out_features)
    w_max = w.amax(dim=1) if clip_max is None else clip_max.to(torch.float32).reshape(groups, out_features)
    w_min = w.amin(dim=1) if clip_min is None else clip_min.to(torch.float32).reshape(groups, out_features)
    scale = ((w_max - w_min) / 15).clamp(min=SCALE_MIN).to(torch.float16)
    scale_f = scale.to(torch.float32)
    zero = (-torch.round(w_min / scale_f)).clamp(0, 15)
    q = (torch.round(w / scale_f.unsqueeze(1)) + zero.unsqueeze(1)).clamp(0, 15)
    qweight = pack_awq(q.reshape(in_features, out_features).to(torch.uint8))
    qzeros = pack_awq(zero.to(torch.uint8))
    return qweight, qzeros, scale


def concat_awq(parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fuse AWQ linears that share their input (q/k/v, gate/up) by concatenating along N.

    Exact, because each part's N is a multiple of 8 and whole int32 columns are concatenated.
    """
    if not parts:
        raise CheckpointError("concat_awq needs at least one AWQ linear to fuse.")
    in_features, groups = parts[0][0].shape[0], parts[0][1].shape[0]
    for qweight, qzeros, scales in parts:
        if qweight.shape[0] != in_features or qzeros.shape[0] != groups or scales.shape[0] != groups:
            raise CheckpointError(
                "cannot fuse AWQ linears with different input sizes or group counts "
                f"(K {qweight.shape[0]} vs {in_features}); the checkpoint's q/k/v or gate/up shapes disagree."
            )
        if scales.shape[1] != qweight.shape[1] * 8 or qzeros.shape[1] != qweight.shape[1]:
            raise CheckpointError(
                f"cannot fuse AWQ linears: scales {tuple(scales.shape)} / qzeros {tuple(qzeros.shape)} do not match "
                f"qweight {tuple(qweight.shape)} (each output size must be a multiple of 8)."
            )
    return (
        torch.cat([p[0] for p in parts], dim=1),
        torch.cat([p[1] for p in parts], dim=1),
        torch.cat([p[2] for p in parts], dim=1),
    )


# ---------------------------------------------------------------------------------------------
# TinyChat v2 (llm-awq `*-w4-g128-awq-v2.pt`, AutoAWQ "GEMVFast")
#
# From the 4-bit matrix Q [N, K] (out×in): inside every 32 input columns reorder to
# 0,1,8,9,16,17,24,25, 2,3,10,11,... then inside every 8 to 0,2,4,6,1,3,5,7; then, for each block of
# 4 output rows and 64 input columns, the 4×64 block (row-major) is re-read as 64 int16 words of 4
# nibbles: word i (of 64) holds row i // 16, permuted columns 4·(i % 16) + 0..3 at bits 0, 4, 8, 12.


def _within32_order(device: torch.device) -> torch.Tensor:
    """perm[p] = original column (0..31) stored at position p after both reorders."""
    p = torch.arange(32, device=device)
    # Undo the "inside every 8" reorder: position e·4 + d came from d·2 + e.
    e, d = (p % 8) // 4, p % 4
    p1 = (p // 8) * 8 + d * 2 + e
    # Undo the 4×4×2 transpose: position b·8 + a·2 + c came from a·8 + b·2 + c.
    b, a, c = p1 // 8, (p1 % 8) // 2, p1 % 2
    return a * 8 + b * 2 + c


def _check_tinychat_dims(out_features: int, in_features: int) -> None:
    if in_features % TINYCHAT_KSTRIDE != 0 or out_features % 8 != 0:
        raise CheckpointError(
            f"a TinyChat v2 linear needs in_features % 64 == 0 and out_features % 8 == 0 "
            f"(got in={in_features}, out={out_features}); this file is not a valid TinyChat v2 checkpoint."
        )


def pack_tinychat_v2_qweight(q_out_in: torch.Tensor) -> torch.Tensor:
    """4-bit values Q [N, K] (out×in, 0..15) → TinyChat v2 qweight int16 [N/4, K]."""
    out_features, in_features = q_out_in.shape
    _check_tinychat_dims(out_features, in_features)
    perm = _within32_order(q_out_in.device)
    q = q_out_in.to(torch.int32).reshape(out_features, in_features // 32, 32)[:, :, perm]
    # [N/4, 4 rows, K/64 blocks, 64] → [N/4, K/64, 4 rows, 64] → words of 4 consecutive nibbles.
    q = q.reshape(out_features // 4, 4, in_features // 64, 64).permute(0, 2, 1, 3)
    q = q.reshape(out_features // 4, in_features // 64, 64, 4) & 0xF
    shifts = torch.tensor([0, 4, 8, 12], dtype=torch.int32, device=q.device)
    words = (q << shifts).sum(dim=-1)
    words = torch.where(words >= 2**15, words - 2**16, words)
    return words.reshape(out_features // 4, in_features).to(torch.int16)


def unpack_tinychat_v2_qweight(qweight: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """TinyChat v2 qweight int16 [N/4, K] → 4-bit values Q [N, K] (out×in) as int32."""
    _check_tinychat_dims(out_features, in_features)
    if qweight.dtype != torch.int16 or tuple(qweight.shape) != (out_features // 4, in_features):
        raise CheckpointError(
            f"TinyChat v2 qweight must be int16 of shape {(out_features // 4, in_features)} for "
            f"in={in_features}, out={out_features}; got {qweight.dtype} {tuple(qweight.shape)}."
        )
    words = qweight.to(torch.int32).reshape(out_features // 4, in_features // 64, 64, 1)
    shifts = torch.tensor([0, 4, 8, 12], dtype=torch.int32, device=qweight.device)
    q = (words >> shifts) & 0xF  # [N/4, K/64, 64 words, 4 nibbles] = [N/4, K/64, 4 rows, 64 cols]
    q = q.reshape(out_features // 4, in_features // 64, 4, 64).permute(0, 2, 1, 3)
    q = q.reshape(out_features, in_features // 32, 32)
    out = torch.empty_like(q)
    out[:, :, _within32_order(qweight.device)] = q
    return out.reshape(out_features, in_features)


def tinychat_v2_to_awq(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    scaled_zeros: torch.Tensor,
    in_features: int,
    out_features: int,
    group_size: int = 128,
    name: str = "",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A TinyChat v2 linear → the AWQ GEMM triple (qweight int32 [K, N/8], qzeros, scales fp16 [K/g, N]).

    v2 dequantizes as w = q·scale + scaled_zero with scaled_zero = −scale·zero, so
    zero = round(−scaled_zero / scale): exact for the integer zeros AWQ produces.
    Rows past K/g are padding (zeros) and are dropped.
    """
    where = _label(name)
    if in_features % group_size != 0:
        raise CheckpointError(
            f"{where}TinyChat v2 in_features {in_features} is not divisible by group size {group_size}; "
            "check the group size of the checkpoint."
        )
    groups = in_features // group_size
    for label, tensor in (("scales", scales), ("scaled_zeros", scaled_zeros)):
        if tensor.dim() != 2 or tensor.shape[1] != out_features or tensor.shape[0] < groups or not tensor.is_floating_point():
            raise CheckpointError(
                f"{where}TinyChat v2 {label} must be a float tensor of shape [>= {groups}, {out_features}]; "
                f"got {tensor.dtype} {tuple(tensor.shape)}."
            )
    if qweight.dtype != torch.int16 or tuple(qweight.shape) != (out_features // 4, in_features):
        raise CheckpointError(
            f"{where}TinyChat v2 qweight must be int16 of shape {(out_features // 4, in_features)}; got "
            f"{str(qweight.dtype).removeprefix('torch.')} {tuple(qweight.shape)}: the file is damaged or not a TinyChat v2 checkpoint."
        )
    q = unpack_tinychat_v2_qweight(qweight, out_features, in_features)  # [N, K]
    s = scales[:groups].to(torch.float32).t()  # [N, G]
    sz = scaled_zeros[:groups].to(torch.float32).t()
    safe_s = torch.where(s == 0, torch.ones_like(s), s)
    zero_f = torch.where(s == 0, torch.zeros_like(s), -sz / safe_s)
    zero = torch.round(zero_f)
    # A zero scale with a nonzero scaled_zero, a zero outside 0..15 or far from an integer cannot be
    # expressed in the AWQ layout. 0.1 leaves room for the fp16/bf16 rounding of scale·zero. A NaN
    # (from a NaN scaled_zero, or inf/inf) fails no comparison, so it is named: it packed as any zero.
    bad = ((s == 0) & (sz != 0)) | (zero < 0) | (zero > 15) | ((zero_f - zero).abs() > 0.1) | zero_f.isnan()
    if bool(bad.any()):
        raise CheckpointError(
            f"{where}TinyChat v2 scaled_zeros are not −scale·zero with integer zeros in 0..15; "
            "this checkpoint uses a zero-point convention we cannot import."
        )
    awq_qweight = pack_awq(q.t())
    awq_qzeros = pack_awq(zero.t().to(torch.uint8))
    awq_scales = scales[:groups].to(torch.float16).contiguous()
    return awq_qweight, awq_qzeros, awq_scales


def awq_to_tinychat_v2(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    group_size: int = 128,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The AWQ GEMM triple → TinyChat v2 (qweight int16 [N/4, K], scales, scaled_zeros fp16 [G_pad, N]).

    G_pad is K/g rounded up to a multiple of 8 (times 2 for g = 64, 4 for g = 32, as llm-awq pads);
    padding rows are zero.
    """
    in_features, out_features = validate_awq(qweight, qzeros, scales, group_size)
    groups = in_features // group_size
    multiple = 8 * {32: 4, 64: 2}.get(group_size, 1)
    padded = -(-groups // multiple) * multiple
    q_out_in = unpack_awq(qweight).t()
    zeros = unpack_awq(qzeros).to(torch.float32)
    scales_v2 = torch.zeros(padded, out_features, dtype=torch.float16, device=scales.device)
    scaled_zeros_v2 = torch.zeros_like(scales_v2)
    scales_v2[:groups] = scales.to(torch.float16)
    scaled_zeros_v2[:groups] = (-(scales.to(torch.float32) * zeros)).to(torch.float16)
    return pack_tinychat_v2_qweight(q_out_in), scales_v2, scaled_zeros_v2
