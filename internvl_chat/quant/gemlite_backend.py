"""The "gemlite" int4 backend: GemLite's Triton GEMV on AWQ weights (SPEC §5), an optional dependency.

GemLite (`pip install gemlite`, pure Triton, needs triton >= 3.6) is imported only when a layer asks
for it. Its import reads the CUDA device's properties (`gemlite/triton_kernels/utils.py`), so on a
machine without CUDA it fails; the failure is remembered and reported as one line.

Exact AWQ semantics. `GemLiteLinear.pack(q, scales, zeros, fma_mode=False)` keeps the zeros as zero
points: the kernel dequantizes w = (q − z)·s in the activations' dtype (GemLite's W_group_mode 3)
and accumulates in fp32. (q − z) is a small integer, so in fp16 each weight equals
`dequantize_awq(..., dtype=float16)` exactly; for bf16 activations the fp16 scales are rounded to
bf16 first, as tinygemm does. fma_mode=True would store −z·s instead and round it.

Resident layout (what `pack` builds, kept as buffers of the Int4Linear): `gemlite_qweight` int32
[K/8, N] (bits 4i..4i+3 of word [r, n] hold q[8r + i, n]), `gemlite_scales` and `gemlite_zeros`
[K/g, N] in the compute dtype, and GemLite's meta arguments (ints). The GemLite layer object is
dropped after packing: its tensors are persistent nn.Parameters, which would show up in the model's
parameters and state dict; non-persistent buffers are what the other backends keep.

Which kernel runs: at most `Int4Linear.gemlite_max_rows` rows go through GemLite's
GEMV_REVSPLITK kernel (the one GemLite itself picks for 4-bit and at most 4 rows); more rows
dequantize the resident weight in torch and run a dense matmul. GemLite's GEMM_SPLITK/GEMM kernels
are not used: GEMM_SPLITK loads scales and zeros without a mask, past the end of the tensors when
K is not a multiple of BLOCK_SIZE_K·SPLIT_K (NaN for K = 896 under Triton's interpreter), and
GEMM does not run under the interpreter, so neither can be checked without a GPU.

On a CPU the kernel runs only under Triton's interpreter (TRITON_INTERPRET=1, set before triton
is imported) and with a stand-in for the CUDA properties GemLite reads at import: that is for tests
(tests/gemlite_interpreter.py).
"""

from __future__ import annotations

import importlib
import logging
from types import ModuleType

import torch
from torch import nn

from internvl_chat.quant.awq_format import unpack_awq
from internvl_chat.quant.triton_gemv import triton_interpreting

# GemLite's constraints for a grouped 4-bit layer (GemLiteLinearTriton.__init__, gemv pruning).
_MIN_IN_FEATURES_MULTIPLE = 32
_MIN_GROUP_SIZE = 16
_GEMV_KERNEL = "GEMV_REVSPLITK"
_COMPUTE_DTYPES = (torch.float16, torch.bfloat16)

_gemlite: ModuleType | None = None
_import_error: str | None = None

__all__ = [
    "gemlite_backend_available",
    "gemlite_dense_matmul",
    "gemlite_dense_weight",
    "gemlite_matmul",
    "gemlite_unavailable_reason",
    "init_gemlite",
]


def load_gemlite() -> ModuleType | None:
    """The gemlite module, or None (the reason in `_import_error`); imported once."""
    global _gemlite, _import_error
    if _gemlite is None and _import_error is None:
        # GemLite logs a warning at import when it loads its tuned configs for this GPU (an H100's):
        # not for the chat's terminal.
        gemlite_logger = logging.getLogger("gemlite")
        level = gemlite_logger.level
        gemlite_logger.setLevel(logging.ERROR)
        try:
            _gemlite = importlib.import_module("gemlite")
        except ModuleNotFoundError as exc:
            if exc.name not in (None, "gemlite") and not str(exc.name).startswith("gemlite."):
                _import_error = f"gemlite needs {exc.name}, which is not installed"
            else:
                _import_error = "gemlite is not installed (pip install gemlite)"
        except Exception as exc:  # it reads CUDA properties at import: AssertionError, RuntimeError, ...
            first_line = (str(exc).strip().splitlines() or [""])[0]
            _import_error = f"gemlite failed to import ({type(exc).__name__}: {first_line})"
        finally:
            gemlite_logger.setLevel(level)
    return _gemlite


# On an H200 (gemlite 0.6.0.post2, torch 2.11, 2026-12-04) GemLite's bf16 GEMV gave outputs 1.2-4 %
# (relative norm) off the exact product of the same weights, worst at the longest inputs (K = 18,944),
# and a CUDA-graph replay differed from the eager call: it sums its K-splits into the output in bf16.
# Its fp16 kernels were within 1 %, so activations in bf16 are refused rather than silently off.
BF16_REFUSAL = "GemLite's bf16 kernels are 1-4 % off the exact product (measured on an H200): with it, use --dtype float16"


def gemlite_unavailable_reason(
    device: torch.device | str,
    in_features: int | None = None,
    group_size: int | None = None,
    dtype: torch.dtype | None = None,
) -> str | None:
    """Why the gemlite backend cannot run here (one phrase), or None when it can; `dtype`: the
    activations' (None: not checked)."""
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return "CUDA is not available"
    elif device.type != "cpu" or not triton_interpreting():
        return f"GemLite runs on CUDA GPUs (not on {device.type})"
    if group_size is not None and group_size < _MIN_GROUP_SIZE:
        return f"GemLite needs a group size of at least {_MIN_GROUP_SIZE} (got {group_size})"
    if in_features is not None and in_features % _MIN_IN_FEATURES_MULTIPLE != 0:
        return f"GemLite needs in_features divisible by {_MIN_IN_FEATURES_MULTIPLE} (got {in_features})"
    if load_gemlite() is None:
        return _import_error
    if dtype == torch.bfloat16:
        return BF16_REFUSAL
    return None


def gemlite_backend_available(device: torch.device | str) -> bool:
    """Whether GemLite's kernels can run on `device` (CUDA, or the CPU under Triton's interpreter)."""
    return gemlite_unavailable_reason(device) is None


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The kernel's activation dtype for activations of `dtype` (fp32 runs in fp16, as scales are fp16)."""
    return dtype if dtype in _COMPUTE_DTYPES else torch.float16


def init_gemlite(layer: nn.Module, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> None:
    """Pack an AWQ triple with GemLite and register its tensors on `layer` (an Int4Linear)."""
    gemlite = load_gemlite()
    assert gemlite is not None, "check gemlite_unavailable_reason first"
    compute = _compute_dtype(dtype)
    gemlite_dtype = gemlite.DType.FP16 if compute == torch.float16 else gemlite.DType.BF16
    packer = gemlite.GemLiteLinear(
        W_nbits=4,
        group_size=layer.group_size,
        in_features=layer.in_features,
        out_features=layer.out_features,
        input_dtype=gemlite_dtype,
        output_dtype=gemlite_dtype,
    )
    q_out_in = unpack_awq(qweight, torch.uint8).t().contiguous()
    zeros = unpack_awq(qzeros, torch.uint8).to(compute).t().contiguous()  # [N, K/g], exact small integers
    packer.pack(q_out_in, scales.to(compute).t().contiguous(), zeros, bias=None, fma_mode=False)
    del q_out_in, zeros
    qweight_g, scales_g, zeros_g, meta_scale = (t.detach() for t in packer.get_tensor_args())
    layer.register_buffer("gemlite_qweight", qweight_g, persistent=False)
    layer.register_buffer("gemlite_scales", scales_g, persistent=False)
    layer.register_buffer("gemlite_zeros", zeros_g, persistent=False)
    layer.register_buffer("gemlite_meta_scale", meta_scale, persistent=False)
    layer.gemlite_meta_args = packer.get_meta_args()
    layer.gemlite_kernel = gemlite.core.GEMLITE_MATMUL_TYPES_MAPPING[_GEMV_KERNEL]
    layer.gemlite_dtype = compute


def gemlite_matmul(layer: nn.Module, x2: torch.Tensor) -> torch.Tensor:
    """x2 [M, K] @ W through GemLite's GEMV kernel, in x2's dtype (bias not added)."""
    if x2.shape[0] == 0:
        return x2.new_empty(0, layer.out_features)
    gemlite = load_gemlite()
    xc = x2.to(layer.gemlite_dtype).contiguous()
    tensors = [layer.gemlite_qweight, layer.gemlite_scales, layer.gemlite_zeros, layer.gemlite_meta_scale]
    y = gemlite.forward_functional(xc, None, tensors, layer.gemlite_meta_args, layer.gemlite_kernel)
    return y.to(x2.dtype)


def gemlite_dense_weight(layer: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The resident GemLite weight as dense W [K, N] (in×out) of `dtype`: (q − z)·s in the compute dtype."""
    packed = layer.gemlite_qweight  # int32 [K/8, N]; little-endian byte b holds rows 8r + 2b, 8r + 2b + 1
    words, out_features = packed.shape
    as_bytes = packed.contiguous().view(torch.uint8).reshape(words, out_features, 4)
    nibbles = torch.stack((as_bytes & 0xF, as_bytes >> 4), dim=-1)  # [K/8, N, 4, 2]
    q = nibbles.permute(0, 2, 3, 1).reshape(layer.in_features // layer.group_size, layer.group_size, out_features)
    del nibbles
    w = q.to(layer.gemlite_dtype)
    del q
    # In place, in this order: (q − z)·s rounded once, as the kernel computes it (no fused multiply-add).
    w.sub_(layer.gemlite_zeros.unsqueeze(1)).mul_(layer.gemlite_scales.unsqueeze(1))
    return w.reshape(layer.in_features, out_features).to(dtype)


def gemlite_dense_matmul(layer: nn.Module, x2: torch.Tensor) -> torch.Tensor:
    """x2 [M, K] @ W through a dense weight built on the fly from the resident tensors."""
    return x2 @ gemlite_dense_weight(layer, x2.dtype)
