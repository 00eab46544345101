"""What this CPU computes fast, and the default dtype that follows from it.

oneDNN runs bf16 matrix products natively only with AVX512-BF16 or AMX; on other x86 CPUs it
emulates them (2-4× slower than fp32), so there a bf16 prefill computes in fp32 over upcast
weights (language.UPCAST_MIN_ROWS), ×0.8-0.95 of an fp32 prefill. With native bf16 prefill is
~2× faster. Decode is bound by memory bandwidth either way: bf16 reads half the bytes, streamed at
full speed by native bf16 or, with AVX2 and FMA, by the compiled step's GEMV kernel (cpu_gemv.py).
$ONEDNN_MAX_CPU_ISA caps what oneDNN may use, so a cap below the bf16 ISAs counts as "no native
bf16" (it is also how the slower path is measured on a bf16 CPU).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch

_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
# oneDNN ISA names (upper case) that include native bf16 dot products
_BF16_ISAS = ("BF16", "AMX", "AVX10")
_FP16_FLAGS = ("avx512_fp16", "amx_fp16")
_FP16_ISAS = ("FP16", "AVX10")
# A decoder this large is bandwidth-bound on CPU: bf16 halves the bytes each token reads. Smaller
# models are dominated by per-call overheads, where oneDNN's bf16 calls cost more than MKL's fp32.
BF16_MIN_DECODER_BYTES = 256 * 2**20
# x86 flags the compiled step's GEMV kernel needs (cpu_gemv.py)
GEMV_FLAGS = ("avx2", "fma")
# and those its AVX-512 variant of the four-row groups needs (csrc/gemv_avx512.h)
GEMV_AVX512_FLAGS = ("avx512f",)


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The instruction-set flags of this CPU (Linux /proc/cpuinfo; empty elsewhere, or where no
    line reads `flags : …`: a "flags" line without its colon, from an emulated or cut-short
    /proc/cpuinfo, raised IndexError at start)."""
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            name, colon, value = line.partition(":")
            if colon and name.strip() == "flags":
                return frozenset(value.split())
    except OSError:
        pass
    return frozenset()


def native_bf16() -> bool:
    """Whether bf16 matrix products run natively here (not emulated in fp32 by oneDNN)."""
    return _native(_BF16_FLAGS, _BF16_ISAS)


def native_fp16() -> bool:
    """Whether fp16 matrix products run natively here (AVX512-FP16 or AMX-FP16)."""
    return _native(_FP16_FLAGS, _FP16_ISAS)


def _native(flags: tuple[str, ...], isas: tuple[str, ...]) -> bool:
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "").strip().upper()
    if cap and cap not in ("ALL", "DEFAULT") and not any(isa in cap for isa in isas):
        return False
    return any(flag in cpu_flags() for flag in flags)


def computes_natively(dtype: torch.dtype) -> bool:
    """Whether this CPU's matrix products in `dtype` are native (fp32 always; 16-bit ones else
    run ~5-6× slower than fp32 at prefill shapes, emulated)."""
    if dtype == torch.bfloat16:
        return native_bf16()
    if dtype == torch.float16:
        return native_fp16()
    return True


def decoder_weight_bytes(text_cfg, bytes_per_weight: int = 2) -> int:
    """Bytes of the language model's layers and lm_head at `bytes_per_weight`, from its config."""
    t = text_cfg
    per_layer = t.hidden_size * (t.q_size + 2 * t.kv_size) + t.q_size * t.hidden_size + 3 * t.hidden_size * t.intermediate_size
    return (t.num_layers * per_layer + t.vocab_size * t.hidden_size) * bytes_per_weight


def kv_cache_dtype(device: torch.device, dtype: torch.dtype, decoder_bytes: int) -> torch.dtype:
    """The KV cache's dtype for a decoder of `decoder_bytes` (decoder_weight_bytes) computing in
    `dtype` on `device`.

    A small bf16 decoder on a CPU without native bf16 keeps its cache in fp32: its step is fixed
    cost, and SDPA's fp32 path costs less per call than its bf16 one, which converts through
    emulated bf16 products (demo model: +8-17 % tok/s from a fresh context, measured interleaved;
    level after 2k tokens; benchmarks/RESULTS.md).
    The cache holds the same bf16-rounded keys and values, exactly. The 0.5B shape decoded ~7 %
    slower with it, fresh and after 4k tokens, so larger decoders keep the model's dtype, as do
    CUDA, native bf16 (not measured), fp32 and fp16."""
    if device.type == "cpu" and dtype == torch.bfloat16 and decoder_bytes < BF16_MIN_DECODER_BYTES and not native_bf16():
        return torch.float32
    return dtype


def vision_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The dtype the vision encoder and projector (`vision_model`, `mlp1`) keep and compute in.

    On a CPU they take fp32 unless `dtype` runs natively: emulated bf16 (and fp16) products there
    are ~6× slower than fp32 at the encoder's shapes (an InternVL3-1B tile through encode_images
    on one Zen 3 thread: 76-79 s with a bf16 tower, 12.7-13.0 s with fp32; benchmarks/RESULTS.md).
    The encoder reads each weight once per batch of tiles, so holding it in fp32 costs memory
    (+0.6 GB for InternViT-300M), not speed; its features reach the decoder in the model's dtype."""
    if device.type != "cpu" or computes_natively(dtype):
        return dtype
    return torch.float32


def gemv_kernel() -> str:
    """Which of the compiled step's GEMV kernels suits this CPU: "avx512" where it reports
    AVX-512F (the 0.5B shape's C++ step on one thread of an Emerald Rapids Xeon: fp32 ×1.09-1.10,
    bf16 ×1.17-1.20 of AVX2, benchmarks/RESULTS.md Update 12; not measured on Zen 4), else
    "avx2"."""
    return "avx512" if all(flag in cpu_flags() for flag in GEMV_AVX512_FLAGS) else "avx2"


def bf16_decodes_fast() -> bool:
    """Whether a bf16 weight streams as fast as its bytes allow in a decode step here: native bf16,
    or AVX2 and FMA, with which the compiled step's GEMV kernel converts bf16 in registers."""
    return native_bf16() or all(flag in cpu_flags() for flag in GEMV_FLAGS)


def default_cpu_dtype(cfg) -> torch.dtype:
    """bf16 for a bandwidth-bound decoder where bf16 decodes fast (`bf16_decodes_fast`), fp32
    otherwise. Without native bf16 that trades a slower prefill (fp32 products over upcast
    weights, ×0.8–0.95 of fp32) for a decode that reads half the bytes (×1.6–1.7 of fp32 on the
    0.5B shape, Zen 3, benchmarks/RESULTS.md) and half the memory."""
    if bf16_decodes_fast() and decoder_weight_bytes(cfg.text) >= BF16_MIN_DECODER_BYTES:
        return torch.bfloat16
    return torch.float32
