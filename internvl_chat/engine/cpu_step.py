"""The whole one-token decode step in C++ (csrc/decode_step.cpp), for a CPU with AVX2 and FMA.

On a small model a decode step is almost all fixed cost: Inductor's compiled step still makes
~20 operator calls a token (each GEMV, SDPA with its views, the allocations between them) through
the dispatcher, which cost more than the arithmetic (the demo model: ~55 % of a step outside the
GEMV kernel, measured with perf). `internvl_chat.DecodeStep` does the step in one call: it holds
the weights, writes activations into buffers it owns, and runs the same GEMV kernels
(gemv_avx2.h), its own attention over the valid cache prefix (each kv head's group of q heads
reads its keys and values once), RMSNorm, RoPE and SiLU·mul. With bf16 weights it rounds to bf16
where the eager step holds bf16 tensors. It lives in the GEMV kernel's library, built once per
machine (cpu_gemv.py), so it needs no Inductor compile at all.

`CompiledStep` (compiled.py) uses it for a Qwen2 decoder whose linears are plain float32 or
bfloat16 `nn.Linear`s with a float32 or bfloat16 KV cache; anything else (a W4 model's Int4Linear
layers, fp16) keeps the Inductor step.
"""

from __future__ import annotations

import torch
from torch import nn

from . import cpu_gemv
from .vision import RMSNorm

DTYPES = cpu_gemv.DTYPES  # weights and KV caches it reads: float32, bfloat16


def _weights(lm) -> list:
    """Every weight the step reads, in DecodeStep's order (without the RoPE tables): embedding,
    final norm, lm_head, then per layer its input norm, qkv weight and bias, o, post-attention
    norm, gate_up and down."""
    decoder = lm.model
    weights = [decoder.embed_tokens.weight, decoder.norm.weight, lm.lm_head.weight]
    for layer in decoder.layers:
        attn, mlp = layer.self_attn, layer.mlp
        weights += [layer.input_layernorm.weight, attn.qkv_proj.weight, attn.qkv_proj.bias, attn.o_proj.weight,
                    layer.post_attention_layernorm.weight, mlp.gate_up_proj.weight, mlp.down_proj.weight]  # fmt: skip
    return weights


def unsupported(lm) -> str | None:
    """None when the C++ step can run `lm` (a Qwen2ForCausalLM) now, else why not."""
    if not cpu_gemv.loaded():
        return f"the AVX2 kernels are not loaded ({cpu_gemv.failure() or 'not built'})"
    decoder = lm.model
    dtype = decoder.embed_tokens.weight.dtype
    if dtype not in DTYPES:
        return f"weights in {dtype}"
    for i, layer in enumerate(decoder.layers):
        attn, mlp = layer.self_attn, layer.mlp
        linears = (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
        if any(type(m) is not nn.Linear for m in linears) or attn.qkv_proj.bias is None:
            return f"layer {i} is not a float Qwen2 layer"
        if any(m.bias is not None for m in linears[1:]):
            return f"layer {i} has a bias the C++ step does not add"
        if type(layer.input_layernorm) is not RMSNorm or type(layer.post_attention_layernorm) is not RMSNorm:
            return f"layer {i} does not use RMSNorm"
        if layer.input_layernorm.eps != decoder.norm.eps or layer.post_attention_layernorm.eps != decoder.norm.eps:
            return f"layer {i} has another RMSNorm epsilon"
    if type(lm.lm_head) is not nn.Linear or lm.lm_head.bias is not None or type(decoder.norm) is not RMSNorm:
        return "the output head is not a float linear without bias"
    if any(t.device.type != "cpu" or t.dtype != dtype or not t.is_contiguous() for t in _weights(lm)):
        return "weights of mixed dtypes, or not contiguous CPU tensors"
    caches = [t for pair in lm.caches() for t in pair]
    if not caches or any(t.dtype not in DTYPES or not t.is_contiguous() for t in caches):
        return "the KV cache is not a contiguous float32 or bfloat16 tensor"
    return None


class CpuStep:
    """`step(token, pos)` → float32 logits [V]: `lm.decode_exact` in one C++ call.

    The C++ object holds the weights and RoPE tables it was built from; when `lm.weights_version`
    moves (a conversion such as `.to()`: new tensors) or the tables are new (`allocate_cache`) it
    is built again, and when `lm.caches()` gives another list (a serve slot's own KV) the caches
    are bound again."""

    def __init__(self, lm):
        self.lm = lm
        self._version = None
        self._tables = None  # the RoPE table built into the step (a new cache allocation makes new ones)
        self._caches = None
        self._step = None

    def _build(self) -> None:
        lm, cfg = self.lm, self.lm.cfg
        weights = _weights(lm)
        tensors = [t.detach() for t in weights[:3] + [lm.cos, lm.sin] + weights[3:]]
        shape = [cfg.num_heads, cfg.num_kv_heads, cfg.head_dim]
        self._step = torch.classes.internvl_chat.DecodeStep(tensors, shape, float(lm.model.norm.eps))
        self._version, self._tables, self._caches = lm.weights_version, lm.cos, None

    def check(self, token: torch.Tensor) -> None:
        """Build, and run one step at position 2 on scratch caches (never the conversation's)."""
        self._build()
        with torch.inference_mode():  # untouched pages of an empty tensor never become resident
            scratch = [torch.empty_like(t) for pair in self.lm.caches() for t in pair]
            for t in scratch:
                t[:, :, :3].zero_()  # the positions the check reads
        self._step.bind_caches(scratch[0::2], scratch[1::2])
        logits = self._step.step(token, 2)
        self._caches = None  # the real caches are bound at the first step
        if logits.shape != (self.lm.lm_head.out_features,) or not torch.isfinite(logits).all():
            raise RuntimeError("the C++ decode step gave no finite logits")

    def __call__(self, token: torch.Tensor, pos: int) -> torch.Tensor:
        if self._version != self.lm.weights_version or self._tables is not self.lm.cos:
            reason = unsupported(self.lm)
            if reason is not None:
                raise RuntimeError(f"the C++ decode step cannot run this model any more: {reason}")
            self._build()
        caches = self.lm.caches()
        if caches is not self._caches:
            self._step.bind_caches([k for k, _ in caches], [v for _, v in caches])
            self._caches = caches
        return self._step.step(token, pos)
