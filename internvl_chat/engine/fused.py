"""Fused kernels for the eager decoder on CUDA: ~34 kernels a layer become 9.

A layer in plain torch ops launches ~34 kernels for little work each: RMSNorm in seven pieces
(twice), RoPE in nine, two cache writes, SiLU and the multiply, two residual adds. Inside a CUDA
graph each still costs a launch's worth of GPU time, and the app decodes in graphs without
compiling by default (a compile takes 17-33 s on an H200). Triton kernels (fused_kernels.py)
take their place where the eager step runs on CUDA, around the four linears and attention:

- `add_rms_norm`: a residual add and the RMSNorm after it (the next layer's input norm or the
  final norm included), one row per program;
- `rope_and_cache`: RoPE on q and k with k and v written into the KV cache at their positions
  (a 4-bit qkv's bias added first);
- `silu_mul`: SiLU(gate) · up from the fused gate_up output;
- `decode_attention`: from SPLIT_ATTENTION_MIN_KEYS keys, one token's attention split over the
  cache's length (two kernels), where SDPA would run one program per KV head.

Under torch.compile the plain ops stay (Inductor fuses them itself); on a CPU too (the C++ step
and Inductor's; tests run these kernels there in Triton's interpreter by setting ENABLED["cpu"]).
"""

from __future__ import annotations

import functools

import torch

from ..quant.triton_gemv import triton_interpreting, triton_unavailable_reason

# Where the fused kernels replace the torch ops (CPU: tests, under TRITON_INTERPRET=1)
ENABLED = {"cuda": True, "cpu": False}


# Whether the kernels ran and gave the torch ops' values here, by (device type, dtype): `_verdict`
_verdicts: dict[tuple[str, torch.dtype], bool] = {}


def active(t: torch.Tensor) -> bool:
    """Whether the eager layers computing `t` take the fused kernels."""
    device = t.device.type
    if not ENABLED.get(device, False) or torch.compiler.is_compiling():
        return False
    if device == "cpu" and not triton_interpreting():
        return False
    verdict = _verdicts.get((device, t.dtype))
    return verdict if verdict is not None else _verdict(t.device, t.dtype)


def verdicts(device_type: str) -> dict[str, bool]:
    """The checks run so far on that device type, by dtype name (empty: none yet)."""
    return {str(dtype).removeprefix("torch."): ok for (device, dtype), ok in _verdicts.items() if device == device_type}


def _verdict(device: torch.device, dtype: torch.dtype) -> bool:
    """Run each kernel once on small tensors of `dtype` against the torch ops, the first time (in
    the model's dtype: the variants it compiles are the ones the model launches): Triton may be
    missing, or unable to build its launcher (it needs a C compiler the first time), or broken.
    Then one note, and the torch ops from then on; never a failed answer."""
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return False  # never probe inside a capture (the warm-up before it probed already)
    from .compiled import _one_line, _stderr_note

    failure = triton_unavailable_reason(device)  # no Triton (or a broken one), or no GPU
    if failure is None:
        try:
            _check_against_torch_ops(device, dtype)
        except Exception as e:  # noqa: BLE001 — whatever fails here, the torch ops still answer
            failure = _one_line(e)
    _verdicts[(device.type, dtype)] = failure is None
    if failure is not None:
        _stderr_note(f"the fused {device.type.upper()} kernels could not run ({failure}); using torch's ops")
    return failure is None


def _check_against_torch_ops(device: torch.device, dtype: torch.dtype = torch.float32) -> None:
    from .language import apply_rope
    from .vision import RMSNorm

    gen = torch.Generator().manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    x, residual, gate_up = randn(2, 64), randn(2, 64), randn(2, 64)
    norm = RMSNorm(64, 1e-6).to(device=device, dtype=dtype)
    cos, sin = (torch.randn(2, 1, 4, generator=gen).to(device) for _ in range(2))  # RoPE tables: float32
    qkv = randn(1, 2, 4 * 8)  # 2 q heads, 1 kv head of 8
    caches = [torch.zeros(1, 1, 4, 8, device=device, dtype=dtype) for _ in range(6)]
    normed, total = add_rms_norm(x, residual, norm)
    rotated = apply_rope(qkv[..., :24].view(1, 2, 3, 8), cos, sin)
    gate, up = gate_up.chunk(2, dim=-1)
    pairs = [
        (normed, norm(x + residual)), (total, x + residual), (add_rms_norm(x, None, norm)[0], norm(x)),
        (silu_mul(gate_up), torch.nn.functional.silu(gate) * up),
    ]  # fmt: skip
    # both ways of giving positions: the first of consecutive ones (prefill), a device tensor (graphs)
    for positions, (k_cache, v_cache) in ((1, caches[:2]), (torch.tensor([1, 2], device=device), caches[2:4])):
        q = rope_and_cache(qkv, cos, sin, positions, k_cache, v_cache, 2, 1, 8)
        pairs += [(q, rotated[:, :, :2]), (k_cache[0, 0, 1:3], rotated[0, :, 2]), (v_cache[0, 0, 1:3], qkv[0, :, 24:])]
    bias = randn(32)  # a bias the linear left to add (W4 layers)
    biased = apply_rope((qkv + bias)[..., :24].view(1, 2, 3, 8), cos, sin)
    q = rope_and_cache(qkv, cos, sin, 1, caches[4], caches[5], 2, 1, 8, bias)
    pairs += [(q, biased[:, :, :2]), (caches[4][0, 0, 1:3], biased[0, :, 2]), (caches[5][0, 0, 1:3], (qkv + bias)[0, :, 24:])]
    q, keys, values = randn(1, 1, 2, 16), randn(1, 1, 300, 16), randn(1, 1, 300, 16)
    want = torch.nn.functional.scaled_dot_product_attention(q.view(1, 1, 2, 16), keys[:, :, :251], values[:, :, :251]).view(1, 1, 32)
    for last in (250, torch.tensor([250], device=device)):  # two splits, the second partly visible
        pairs.append((decode_attention(q, keys, values, 300, last), want))
    # a broken kernel is far off; 16 bits round (and sum in another order) an ulp or two apart
    tolerance = 1e-4 if dtype == torch.float32 else 3e-2
    for got, want in pairs:
        off = (got.float() - want.float()).abs().max().item()
        if off > tolerance * (1 + want.float().abs().max().item()):
            raise RuntimeError(f"a kernel is off by {off:.3g}")


@functools.cache
def _kernels(interpreted: bool):
    """(add_rms_norm, silu_mul, rope_cache, decode_attention, its reduce): JIT-compiled, or
    interpreted for CPU tensors."""
    import triton

    from . import fused_kernels as k

    kernels = (k.add_rms_norm_kernel, k.silu_mul_kernel, k.rope_cache_kernel, k.decode_attention_kernel, k.decode_attention_reduce_kernel)
    if interpreted:
        from triton.runtime.interpreter import InterpretedFunction

        return tuple(InterpretedFunction(kernel) for kernel in kernels)
    return tuple(triton.JITFunction(kernel) for kernel in kernels)


def _launcher(index: int, t: torch.Tensor):
    return _kernels(t.device.type == "cpu")[index]


def _next_power_of_two(n: int) -> int:
    return 1 << (n - 1).bit_length()


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, norm) -> tuple[torch.Tensor, torch.Tensor]:
    """(norm(h), h) with h = x + residual (x when residual is None), as RMSNorm computes it
    (vision.RMSNorm: float32, cast back, times the weight). x [..., D] contiguous."""
    x = x.contiguous()
    d = x.shape[-1]
    rows = x.numel() // d
    weight = norm.weight
    out = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    total = torch.empty_like(x) if residual is not None else x
    block = _next_power_of_two(d)
    _launcher(0, x)[(rows,)](
        x, residual if residual is not None else x, weight, out, total, d, norm.eps,
        HAS_RES=residual is not None, BLOCK=block, INTERPRETED=x.device.type == "cpu", num_warps=8 if block >= 4096 else 4,
    )  # fmt: skip
    return out, total


SILU_BLOCK = 1024


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) · up for gate_up = [gate | up] on its last axis (contiguous)."""
    gate_up = gate_up.contiguous()
    inter = gate_up.shape[-1] // 2
    rows = gate_up.numel() // (2 * inter)
    out = torch.empty(*gate_up.shape[:-1], inter, dtype=gate_up.dtype, device=gate_up.device)
    _launcher(1, gate_up)[(rows, -(-inter // SILU_BLOCK))](gate_up, out, inter, BLOCK=SILU_BLOCK, num_warps=4)
    return out


def takes_rope(qkv: torch.Tensor, k_cache: torch.Tensor, head_dim: int) -> bool:
    """Whether `rope_and_cache` takes this layer: the cache in the activations' dtype, contiguous,
    and a head size with a power-of-two half."""
    half = head_dim // 2
    return k_cache.dtype == qkv.dtype and k_cache.is_contiguous() and half >= 1 and half & (half - 1) == 0 and head_dim % 2 == 0


def rope_and_cache(
    qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions, k_cache: torch.Tensor, v_cache: torch.Tensor,
    heads: int, kv_heads: int, head_dim: int, bias: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """q [1, T, heads, hd] rotated, from qkv [1, T, (heads + 2·kv_heads)·hd] (+ `bias`, where the
    linear left it to add); k rotated and v written into the caches [1, kv_heads, S, hd] at
    `positions` (an int: the first of T consecutive ones; or a device LongTensor [T]). cos/sin:
    [T, 1, hd/2] float32."""
    t = qkv.shape[1]
    half = head_dim // 2
    q = torch.empty(1, t, heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    in_tensor = isinstance(positions, torch.Tensor)
    qkv = qkv.contiguous()
    _launcher(2, qkv)[(t, heads + 2 * kv_heads)](
        qkv, bias.to(qkv.dtype).contiguous() if bias is not None else qkv, cos.reshape(t, half).contiguous(),
        sin.reshape(t, half).contiguous(), positions if in_tensor else qkv, q, k_cache, v_cache,
        0 if in_tensor else positions, k_cache.shape[2],
        HEADS=heads, KV_HEADS=kv_heads, HALF=half, POSITIONS_IN_TENSOR=in_tensor, HAS_BIAS=bias is not None, num_warps=1,
    )  # fmt: skip
    return q


# One-token attention split over the KV length (flash-decoding): keys a program takes, in blocks
# of ATTENTION_BLOCK. At batch 1 SDPA runs one program per KV head (4 on the 8B decoder) over the
# whole cache, a few percent of a GPU's memory bandwidth once the context is long; the splits give
# kv_len / 256 programs a head. Used from SPLIT_ATTENTION_MIN_KEYS attended keys (a guess until
# measured on a GPU: below it the cache is small and SDPA's one kernel may do as well).
ATTENTION_SPLIT = 256
ATTENTION_BLOCK = 64
SPLIT_ATTENTION_MIN_KEYS = 1024


def takes_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, kv_len: int) -> bool:
    """Whether `decode_attention` takes this step: a long enough cache in q's dtype, contiguous,
    and a head size of at least 16 that is a power of two."""
    hd = q.shape[-1]
    return (kv_len >= SPLIT_ATTENTION_MIN_KEYS and k_cache.dtype == q.dtype and k_cache.is_contiguous()
            and hd >= 16 and hd & (hd - 1) == 0)  # fmt: skip


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, kv_len: int, last) -> torch.Tensor:
    """One query token's attention: q [1, 1, heads, hd] against the first `kv_len` positions of
    the caches [1, kv_heads, S, hd], keys 0 … `last` visible (an int, or a device LongTensor [1]:
    the graphs' position) → [1, 1, heads·hd] in q's dtype, softmax(q·kᵀ/√hd)·v as SDPA gives it."""
    q = q.contiguous()
    heads, hd = q.shape[2], q.shape[3]
    kv_heads, cache_len = k_cache.shape[1], k_cache.shape[2]
    group = heads // kv_heads
    group_pad = max(16, _next_power_of_two(group))  # tl.dot takes 16 rows at least
    splits = -(-kv_len // ATTENTION_SPLIT)
    acc = torch.empty(kv_heads, splits, group_pad, hd, dtype=torch.float32, device=q.device)
    ml = torch.empty(kv_heads, splits, group_pad, 2, dtype=torch.float32, device=q.device)
    out = torch.empty(1, 1, heads * hd, dtype=q.dtype, device=q.device)
    in_tensor = isinstance(last, torch.Tensor)
    interpreted = q.device.type == "cpu"
    _launcher(3, q)[(kv_heads, splits)](
        q, k_cache, v_cache, last if in_tensor else q, acc, ml, 0 if in_tensor else last, cache_len, hd**-0.5,
        GROUP=group, GROUP_PAD=group_pad, HD=hd, SPLIT=ATTENTION_SPLIT, BLOCK_N=ATTENTION_BLOCK,
        LAST_IN_TENSOR=in_tensor, IEEE=q.dtype == torch.float32, INTERPRETED=interpreted, num_warps=4,
    )  # fmt: skip
    _launcher(4, q)[(kv_heads, group)](
        acc, ml, out, splits, GROUP=group, GROUP_PAD=group_pad, HD=hd, SPLITS_PAD=_next_power_of_two(splits),
        INTERPRETED=interpreted, num_warps=4,
    )  # fmt: skip
    return out
