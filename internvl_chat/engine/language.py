"""Qwen2 decoder with a static, preallocated KV cache (the discipline of gpt-fast).

Positions arrive as a device tensor and the attended key range `kv_len` as a Python int, so the
same code serves prefill, plain decode, and a CUDA-graph-captured decode (fixed `kv_len` bucket,
positions written into a static buffer). Nothing here synchronises with the host.

q/k/v and gate/up are fused into one linear each; `engine/model.py` fills their row blocks from
the separate checkpoint tensors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import TextConfig
from .vision import RMSNorm


def rope_tables(head_dim: int, max_len: int, theta: float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [max_len, head_dim] in float32 for the rotate-half convention Qwen2 uses."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim))
    angles = torch.outer(torch.arange(max_len, dtype=torch.float64, device=device), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [1, heads, T, hd]; cos/sin [T, hd] float32. Computed in float32 like the reference."""
    xf = x.float()
    half = xf.shape[-1] // 2
    rotated = torch.cat([-xf[..., half:], xf[..., :half]], dim=-1)
    return (xf * cos + rotated * sin).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size, self.kv_size = cfg.q_size, cfg.kv_size
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=True)
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=False)

    def forward(self, x, cos, sin, positions, kv_len, mask, k_cache, v_cache):
        t = x.shape[1]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(1, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.view(1, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(1, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k_cache.index_copy_(2, positions, k)
        v_cache.index_copy_(2, positions, v)
        keys, values = k_cache[:, :, :kv_len], v_cache[:, :, :kv_len]
        gqa = self.num_kv_heads != self.num_heads
        if isinstance(mask, str):  # "causal": a prefill from position 0 (lets SDPA pick flash kernels)
            out = F.scaled_dot_product_attention(q, keys, values, is_causal=True, enable_gqa=gqa)
        else:
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=gqa)
        return self.o_proj(out.transpose(1, 2).reshape(1, t, self.q_size))


class MLP(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.intermediate_size = cfg.intermediate_size
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.intermediate_size, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, h, cos, sin, positions, kv_len, mask, k_cache, v_cache):
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, positions, kv_len, mask, k_cache, v_cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class Qwen2Decoder(nn.Module):
    """`language_model.model`: embeddings, layers, final norm."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        # no random init (the weights are loaded): normal_ on "meta" would import torch._dynamo
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, _weight=torch.empty(cfg.vocab_size, cfg.hidden_size))
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Qwen2ForCausalLM(nn.Module):
    """`language_model`: decoder + lm_head, owning the static KV cache and the RoPE tables."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.model = Qwen2Decoder(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.k_cache: list[torch.Tensor] = []
        self.v_cache: list[torch.Tensor] = []
        self.max_seq_len = 0

    def allocate_cache(self, max_seq_len: int, device: torch.device, dtype: torch.dtype) -> None:
        shape = (1, self.cfg.num_kv_heads, max_seq_len, self.cfg.head_dim)
        self.k_cache = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(self.cfg.num_layers)]
        self.v_cache = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(self.cfg.num_layers)]
        self.cos, self.sin = rope_tables(self.cfg.head_dim, max_seq_len, self.cfg.rope_theta, device)
        self.max_seq_len = max_seq_len

    def cache_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k_cache + self.v_cache)

    def forward_embeds(
        self, h: torch.Tensor, positions: torch.Tensor, kv_len: int, start_pos: int | None, last_only: bool
    ) -> torch.Tensor:
        """h [1, T, D] at `positions` [T] (device) → float32 logits [T or 1, V].

        `start_pos` is the first position when the caller knows it on the host; None means the
        positions live only on the device (graph replay) and `kv_len` is a bucket to be masked.
        """
        t = h.shape[1]
        cos, sin = self.cos[positions], self.sin[positions]
        if start_pos is not None and t == 1 and kv_len == start_pos + 1:
            mask = None  # one new token sees the whole valid cache
        elif start_pos == 0 and kv_len == t:
            mask = "causal"
        else:
            # query i may see key j iff j <= its position; built on device, no host sync
            mask = torch.arange(kv_len, device=h.device)[None, :] <= positions[:, None]
        for layer, k_cache, v_cache in zip(self.model.layers, self.k_cache, self.v_cache):
            h = layer(h, cos, sin, positions, kv_len, mask, k_cache, v_cache)
        if last_only:
            h = h[:, -1:]
        return self.lm_head(self.model.norm(h))[0].float()
