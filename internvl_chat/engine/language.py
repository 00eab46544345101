"""Qwen2 decoder with a static, preallocated KV cache (the discipline of gpt-fast).

One set of layers, four entry points:
- `forward_embeds(h, start_pos, last_only)`: prefill or an eager decode step. The first position
  is a host int, so K/V go into the cache slice [start_pos, start_pos + T) and attention reads
  exactly the valid prefix `start_pos + T` (one new token needs no mask at all).
- `decode_exact(token, pos)`: the same one-token step as a function of (token tensor, int); the
  compiled CPU step (engine/compiled.py) traces it with `pos` symbolic, so one compiled graph
  serves every cache length.
- `decode_masked(token, position, kv_len)`: the position lives on the device and attention reads a
  fixed `kv_len` bucket with the stale tail masked (CUDA-graph replay: static shapes, no host sync).
- `prefill_masked(ids, positions, last, kv_len)`: the same for a short chunk padded to a fixed
  length (a follow-up turn's prefill replayed from a CUDA graph).

The code is written for Inductor to fuse: RoPE is applied to q and k in one expression (qkv bias
included, float32 like the reference), residual adds sit next to the RMSNorm that follows them,
SiLU·mul is one expression, and cache writes are in-place slice copies or `index_copy_` into the
cache buffers. Nothing here synchronises with the host.

q/k/v and gate/up are fused into one linear each; `engine/model.py` fills their row blocks from
the separate checkpoint tensors.
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F
from torch import nn

from . import cpu_gemv, fused
from .config import TextConfig
from .cpu_features import computes_natively
from .vision import RMSNorm


def rope_tables(head_dim: int, max_len: int, theta: float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [max_len, 1, head_dim/2] in float32 for Qwen2's rotate-half convention.

    Rotate-half uses the same angle for element i and i + head_dim/2, so half a table suffices;
    the middle axis broadcasts over heads."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim))
    angles = torch.outer(torch.arange(max_len, dtype=torch.float64, device=device), inv_freq)
    return angles.cos().float()[:, None], angles.sin().float()[:, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [1, T, heads, hd] (token-major); cos/sin [T, 1, hd/2] float32. Computed in float32 like
    the reference: (x1, x2) → (x1·cos − x2·sin, x2·cos + x1·sin)."""
    half = x.shape[-1] // 2
    xf = x.float()
    x1, x2 = xf[..., :half], xf[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


# Compiled one-row linears become a multiply-reduce on these devices: Inductor's
# C++ reduction streams the weight at memory bandwidth with every thread, where the BLAS libraries'
# M=1 paths fall short (bf16 most of all: see benchmarks/RESULTS.md). An fp32 weight that fits in
# cache is faster this way too (the demo model: ~1.3-1.5x tok/s over MKL's GEMV, measured), and a
# 16-bit one all the more (oneDNN's per-call setup costs more than the whole product), so every
# size takes it. CUDA keeps cuBLAS until measured.
GEMV_AS_REDUCTION = {"cpu": True, "cuda": False}
# Where several query tokens attend under a mask (a chunk after cached tokens) with grouped KV
# heads, fold each KV head's group of query heads into query rows of that head (`folded_attention`)
# instead of SDPA's enable_gqa: torch's CUDA SDPA takes a mask with enable_gqa only in its math
# kernel, which materialises [heads, T, S] scores in fp32 (5.6 GB for a 13-tile picture after 4k
# tokens on the 8B decoder); folded, the memory-efficient kernel takes it. A CPU keeps enable_gqa:
# its flash kernel takes GQA with a mask, and the fold was ×1.0-1.6 slower there (0.5B heads, 24 to
# 2,048 new tokens after 1-4k cached, fp32 and bf16, 2 threads; the same values).
FOLD_MASKED_GQA = {"cpu": False, "cuda": True}
# bf16 or fp16 prefill on a CPU that emulates the dtype (cpu_features.computes_natively): rows
# from which a linear computes in fp32 with its weight upcast for the call
UPCAST_MIN_ROWS = 32


# Inductor sums a reduction longer than 4,096 elements with a cascade helper (for accuracy) that
# halves the rate at which a multiply-reduce GEMV streams its weight. So a compiled one-row linear
# with longer rows (the MLP's down projection: 4,864 on the 0.5B shape) reads a copy of its weight
# cut into column blocks of at most ROW_CHUNK, each contiguous, and adds the blocks' sums: 0.5B
# down-projection shapes stream ~1.6x (fp32) to ~1.9x (bf16) faster than the one long reduction,
# and faster than oneDNN's packed bf16 GEMV (benchmarks/RESULTS.md, issue 10). The copies are made
# when the step is compiled (`chunk_long_rows`) and cost one more copy of those weights.
ROW_CHUNK = 4096


def chunk_long_rows(lm: nn.Module) -> int:
    """Give every dense linear of `lm` with rows longer than ROW_CHUNK its column-block copy
    (`gemv_chunks`, read by `linear` while compiling); returns the bytes the copies take."""
    drop_row_chunks(lm)
    for module in lm.modules():
        k = module.in_features if type(module) is nn.Linear else 0
        if k <= ROW_CHUNK:
            continue
        blocks = -(-k // ROW_CHUNK)
        size = -(-k // blocks // 16) * 16  # vector-aligned blocks; the last one takes the rest
        with torch.no_grad():
            chunks = [module.weight[:, a : a + size].contiguous() for a in range(0, k, size)]
        module.gemv_chunks = chunks  # a plain attribute: not a parameter, buffer or saved tensor
    return row_chunk_bytes(lm)


def drop_row_chunks(lm: nn.Module) -> None:
    for module in lm.modules():
        module.__dict__.pop("gemv_chunks", None)


def row_chunk_bytes(lm: nn.Module) -> int:
    return sum(c.numel() * c.element_size() for m in lm.modules() for c in m.__dict__.get("gemv_chunks", ()))


def linear(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`module(x)`, with two CPU fast paths for a dense nn.Linear:

    - one row while being compiled: y = Σ_k W[n, k]·x[k] (+ b) in float32, by the AVX2 kernel
      where it is loaded (cpu_gemv.py), else as a multiply-reduce that Inductor fuses into one
      kernel (eager code never takes this form: it would materialise W·x); x is stored once, not
      recomputed for every weight row (compiled.CPU_OPTIONS), and rows longer than ROW_CHUNK are
      read from their column-block copy (`chunk_long_rows`);
    - 16-bit prefill on a CPU that emulates the dtype: computed in fp32 with the weight upcast."""
    if (
        type(module) is nn.Linear
        and torch.compiler.is_compiling()
        and x.shape[:-1].numel() == 1
        and GEMV_AS_REDUCTION.get(x.device.type, False)
    ):
        xf = x.reshape(-1).float()
        if cpu_gemv.takes(module.weight):
            y = torch.ops.internvl_chat.gemv(module.weight, xf)
        elif not hasattr(module, "gemv_chunks"):
            y = (module.weight.float() * xf).sum(-1)
        else:
            start, y = 0, None
            for w in module.gemv_chunks:
                part = (w.float() * xf[start : start + w.shape[1]]).sum(-1)
                y, start = (part if y is None else y + part), start + w.shape[1]
        if module.bias is not None:
            y = y + module.bias.float()
        return y.to(x.dtype).reshape(*x.shape[:-1], -1)
    if (
        x.dtype in (torch.bfloat16, torch.float16)
        and x.device.type == "cpu"
        and x.shape[:-1].numel() >= UPCAST_MIN_ROWS
        and type(module) is nn.Linear
        and not computes_natively(x.dtype)
    ):
        # emulated 16-bit matrix products run at a fifth to half of fp32's speed on such CPUs;
        # upcasting the weight for the call costs less than that (prefill only: many rows)
        bias = module.bias.float() if module.bias is not None else None
        return F.linear(x.float(), _upcast(module.weight), bias).to(x.dtype)
    return module(x)


_upcast_buffers = threading.local()


# the largest fp32 weight `_upcast` keeps a buffer for (a layer's; not a 150k-row lm_head, which
# needs ≥ UPCAST_MIN_ROWS rows of logits and is upcast afresh then)
UPCAST_KEEP_MAX_BYTES = 64 * 2**20


def _upcast(weight: torch.Tensor) -> torch.Tensor:
    """`weight` in float32, in a buffer kept per shape and thread: a new tensor per call costs a
    fresh allocation whose pages the kernel must map and zero every time (a quarter of a 0.5B
    bf16 prefill's time on a CPU without native bf16)."""
    if weight.numel() * 4 > UPCAST_KEEP_MAX_BYTES:
        return weight.float()
    buffers = _upcast_buffers.__dict__.setdefault("by_shape", {})
    key = (tuple(weight.shape), weight.device)
    buffer = buffers.get(key)
    if buffer is None:
        with torch.inference_mode(False):  # a normal tensor: writable in and out of inference mode
            buffer = buffers[key] = torch.empty(weight.shape, dtype=torch.float32, device=weight.device)
    with torch.no_grad():
        return buffer.copy_(weight)


def key_bias(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A bool mask of visible keys as the additive bias SDPA takes as it is: 0 where visible, −inf
    elsewhere, in the attention's dtype. Given a bool mask, every layer's SDPA call converts it
    again (two more kernels a layer, measured as aten ops on the CPU); the graphs' steps build the
    bias once per step instead."""
    return torch.where(visible, 0.0, float("-inf")).to(dtype)


def folded_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """q [1, T, heads, hd] (token-major) against keys/values [1, kv_heads, S, hd] under a mask
    [T, S] (bool, or an additive `key_bias`) → [1, T, heads·hd]. Each KV head's `group` query
    heads become T·group query rows of that head (row t·group + j: token t, head j of the group),
    so no head is repeated and no GQA support is needed; the mask is repeated per row."""
    _, t, heads, hd = q.shape
    kv_heads = keys.shape[1]
    group = heads // kv_heads
    rows = q.reshape(1, t, kv_heads, group, hd).permute(0, 2, 1, 3, 4).reshape(1, kv_heads, t * group, hd)
    out = F.scaled_dot_product_attention(rows, keys, values, attn_mask=mask.repeat_interleave(group, dim=0))
    return out.view(1, kv_heads, t, group, hd).permute(0, 2, 1, 3, 4).reshape(1, t, heads * hd)


def write_cache(cache: torch.Tensor, new: torch.Tensor, positions) -> None:
    """new [1, T, kv_heads, hd] into cache [1, kv_heads, S, hd] at `positions`: an int (or a
    symbolic int when compiled) is the first of T consecutive positions; a tensor lists them."""
    new = new.transpose(1, 2)
    if isinstance(positions, torch.Tensor):
        cache.index_copy_(2, positions, new)
    else:
        cache[:, :, positions : positions + new.shape[2]].copy_(new)


def _rows(h: torch.Tensor, last_only: bool | torch.Tensor) -> torch.Tensor:
    """The rows of h [1, T, D] whose logits `_layers` returns (see there)."""
    if isinstance(last_only, torch.Tensor):
        return h.index_select(1, last_only)
    return h[:, -1:] if last_only else h


class Attention(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size, self.kv_size = cfg.q_size, cfg.kv_size
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=True)
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=False)

    def forward(self, x, cos, sin, positions, kv_len, mask, k_cache, v_cache):
        """`mask`: None (every query sees the first kv_len keys: one new token), "causal" (a
        prefill from position 0), or a bool tensor broadcastable to [T, kv_len]."""
        t = x.shape[1]
        heads, kv_heads, hd = self.num_heads, self.num_kv_heads, self.head_dim
        if fused.active(x) and fused.takes_rope(x, k_cache, hd):
            # a W4 linear leaves its bias to the RoPE kernel (a pass of its own otherwise)
            leaving = getattr(self.qkv_proj, "forward_leaving_bias", None)
            qkv, bias = leaving(x) if leaving is not None else (linear(self.qkv_proj, x), None)
            q = fused.rope_and_cache(qkv, cos, sin, positions, k_cache, v_cache, heads, kv_heads, hd, bias)
        else:
            qkv = linear(self.qkv_proj, x)
            qk = apply_rope(qkv[..., : self.q_size + self.kv_size].view(1, t, heads + kv_heads, hd), cos, sin)
            q, k = qk[:, :, :heads], qk[:, :, heads:]
            v = qkv[..., self.q_size + self.kv_size :].view(1, t, kv_heads, hd)
            write_cache(k_cache, k, positions)
            write_cache(v_cache, v, positions)
        keys, values = k_cache[:, :, :kv_len], v_cache[:, :, :kv_len]
        q = q.to(k_cache.dtype)  # attention runs in the cache's dtype (a no-op when they match)
        if t == 1 and not isinstance(mask, str):
            if fused.active(q) and fused.takes_decode_attention(q, k_cache, kv_len):
                # split over the cache's length; the last visible key: the graphs' device position
                # (masked), else the exact prefix's end
                last = positions if mask is not None else kv_len - 1
                return linear(self.o_proj, fused.decode_attention(q, k_cache, v_cache, kv_len, last).to(x.dtype))
            # One query: each kv head's group of q heads becomes query rows against that head, so
            # one SDPA call reads K/V once, with no head repeat and (exact prefix) no mask.
            out = F.scaled_dot_product_attention(q.reshape(1, kv_heads, heads // kv_heads, hd), keys, values, attn_mask=mask)
            return linear(self.o_proj, out.reshape(1, 1, self.q_size).to(x.dtype))
        gqa = kv_heads != heads
        if gqa and isinstance(mask, torch.Tensor) and FOLD_MASKED_GQA.get(x.device.type, False):
            return linear(self.o_proj, folded_attention(q, keys, values, mask).to(x.dtype))
        q = q.transpose(1, 2)
        if isinstance(mask, str):  # "causal": a prefill from position 0 (lets SDPA pick flash kernels)
            out = F.scaled_dot_product_attention(q, keys, values, is_causal=True, enable_gqa=gqa)
        else:
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=gqa)
        return linear(self.o_proj, out.transpose(1, 2).reshape(1, t, self.q_size).to(x.dtype))


class MLP(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.intermediate_size = cfg.intermediate_size
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = linear(self.gate_up_proj, x)
        if fused.active(gate_up):
            return linear(self.down_proj, fused.silu_mul(gate_up))
        gate, up = gate_up.chunk(2, dim=-1)
        return linear(self.down_proj, F.silu(gate) * up)


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
    """`language_model`: decoder + lm_head, owning the static KV cache and the RoPE tables.

    The cache is one pair of buffers per layer (`layers[i].self_attn.k_cache / v_cache`, not saved
    in state dicts), written in place, so a compiled step sees fixed storage. Its dtype may differ
    from the weights' (`cpu_features.kv_cache_dtype`): attention then runs in the cache's dtype."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.model = Qwen2Decoder(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.max_seq_len = 0
        self.weights_version = 0  # counts `_apply` (.to(), .float(), …): compiled.py's recorded weights go stale

    def allocate_cache(self, max_seq_len: int, device: torch.device, dtype: torch.dtype) -> None:
        shape = (1, self.cfg.num_kv_heads, max_seq_len, self.cfg.head_dim)
        for layer in self.model.layers:
            attn = layer.self_attn
            attn.register_buffer("k_cache", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
            attn.register_buffer("v_cache", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.__dict__.pop("_cache_pairs", None)
        self.cos, self.sin = rope_tables(self.cfg.head_dim, max_seq_len, self.cfg.rope_theta, device)
        self.max_seq_len = max_seq_len

    def caches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The (k, v) cache buffers of every layer, in layer order (the same list until they change:
        every decode step asks, and gathering them anew cost a tiny model ~5 % of a step)."""
        pairs = self.__dict__.get("_cache_pairs")
        if pairs is None:
            layers = [layer.self_attn for layer in self.model.layers]
            pairs = self._cache_pairs = [(a.k_cache, a.v_cache) for a in layers if hasattr(a, "k_cache")]
        return pairs

    def _apply(self, fn, recurse=True):  # .to(), .float(), …: new tensors replace the buffers
        applied = super()._apply(fn, recurse)
        self.__dict__.pop("_cache_pairs", None)
        self.weights_version += 1
        return applied

    @property
    def k_cache(self) -> list[torch.Tensor]:
        return [k for k, _ in self.caches()]

    @k_cache.setter
    def k_cache(self, tensors: list[torch.Tensor]) -> None:
        self._set_cache("k_cache", tensors)

    @property
    def v_cache(self) -> list[torch.Tensor]:
        return [v for _, v in self.caches()]

    @v_cache.setter
    def v_cache(self, tensors: list[torch.Tensor]) -> None:
        self._set_cache("v_cache", tensors)

    def _set_cache(self, name: str, tensors: list[torch.Tensor]) -> None:
        """Point every layer at other cache tensors of the same shape (a serve slot's own KV)."""
        layers = self.model.layers
        if len(tensors) != len(layers):
            raise ValueError(f"{len(tensors)} {name} tensors for {len(layers)} layers")
        for layer, t in zip(layers, tensors):
            current = getattr(layer.self_attn, name)
            if t.shape != current.shape or t.dtype != current.dtype or t.device != current.device:
                raise ValueError(f"a {name} tensor of {tuple(t.shape)} {t.dtype} does not replace {tuple(current.shape)} {current.dtype}")
            layer.self_attn.register_buffer(name, t, persistent=False)
        self.__dict__.pop("_cache_pairs", None)

    def decoder_bytes(self) -> int:
        """Bytes of weights one decode step reads: layers, final norm, lm_head (not the embedding)."""
        caches = {id(t) for pair in self.caches() for t in pair}
        tensors = {id(t): t for t in list(self.parameters()) + list(self.buffers())}
        skip = caches | {id(self.model.embed_tokens.weight)}
        return sum(t.numel() * t.element_size() for key, t in tensors.items() if key not in skip)

    def cache_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k_cache + self.v_cache)

    def forward_embeds(self, h: torch.Tensor, start_pos: int, last_only: bool, caches=None, head: bool = True) -> torch.Tensor:
        """h [1, T, D] at positions start_pos … start_pos + T − 1 → float32 logits [T or 1, V].

        `caches`: the (k, v) pairs to use, default the model's own (a compiled step's warm-up
        passes scratch ones). `head` False: the final norm's rows [1, T or 1, D] instead, for
        `logits` to turn into logits a few rows at a time (a prompt's scoring, model.py)."""
        t = h.shape[1]
        kv_len = start_pos + t
        cos, sin = self.cos[start_pos:kv_len], self.sin[start_pos:kv_len]
        if t == 1:
            mask = None  # one new token sees the whole valid cache
        elif start_pos == 0:
            mask = "causal"
        else:  # a chunk after cached tokens: query i sees key j iff j <= start_pos + i
            keys = torch.arange(kv_len, device=h.device)
            mask = keys[None, :] <= torch.arange(start_pos, kv_len, device=h.device)[:, None]
        return self._layers(h, cos, sin, start_pos, kv_len, mask, last_only, caches, head)

    def logits(self, normed: torch.Tensor) -> torch.Tensor:
        """Float32 logits [T, V] of final-norm rows [1, T, D]."""
        return linear(self.lm_head, normed)[0].float()

    def decode_exact(self, token: torch.Tensor, pos: int, caches=None) -> torch.Tensor:
        """Float32 logits [V] for `token` (LongTensor [1]) at host position `pos`."""
        h = self.model.embed_tokens(token)[None]
        return self.forward_embeds(h, pos, True, caches)[-1]

    def decode_masked(self, token: torch.Tensor, position: torch.Tensor, kv_len: int, caches=None) -> torch.Tensor:
        """Float32 logits [V] for `token` at the device position `position` (LongTensor [1]),
        attending over a fixed `kv_len` bucket whose keys beyond `position` are masked out."""
        h = self.model.embed_tokens(token)[None]
        cos, sin = self.cos[position], self.sin[position]
        caches = caches if caches is not None else self.caches()
        visible = torch.arange(kv_len, device=h.device)[None, :] <= position[:, None]
        mask = key_bias(visible, caches[0][0].dtype)  # [1, kv_len], shared by the layers
        return self._layers(h, cos, sin, position, kv_len, mask, True, caches)[-1]

    def prefill_masked(self, ids: torch.Tensor, positions: torch.Tensor, last: torch.Tensor, kv_len: int, caches=None) -> torch.Tensor:
        """Float32 logits [V] of row `last` (LongTensor [1]) of a chunk `ids` ([T]) at the device
        `positions` ([T], consecutive), attending over a fixed `kv_len` bucket with a causal mask
        built on the device: the shape-static prefill a CUDA graph holds (cuda_graph.py). Rows
        after `last` are padding: they write K/V past the prompt, where nothing is read before a
        later token overwrites it (every step writes its position before attending to it)."""
        h = self.model.embed_tokens(ids)[None]
        cos, sin = self.cos[positions], self.sin[positions]
        caches = caches if caches is not None else self.caches()
        visible = torch.arange(kv_len, device=h.device)[None, :] <= positions[:, None]
        mask = key_bias(visible, caches[0][0].dtype)  # [T, kv_len]
        return self._layers(h, cos, sin, positions, kv_len, mask, last, caches)[-1]

    def _layers(self, h, cos, sin, positions, kv_len, mask, last_only: bool | torch.Tensor, caches, head: bool = True) -> torch.Tensor:
        """`last_only`: logits of the last row only (True), of every row (False), or of the row a
        device index tensor names; `head` False: those rows' final norm, not their logits."""
        caches = caches if caches is not None else self.caches()
        if fused.active(h):
            normed = _rows(self._fused_layers(h, cos, sin, positions, kv_len, mask, caches), last_only)
        else:
            for layer, (k_cache, v_cache) in zip(self.model.layers, caches):
                h = layer(h, cos, sin, positions, kv_len, mask, k_cache, v_cache)
            normed = self.model.norm(_rows(h, last_only))
        return self.logits(normed) if head else normed

    def _fused_layers(self, h, cos, sin, positions, kv_len, mask, caches) -> torch.Tensor:
        """The layers with each residual add fused into the RMSNorm after it (fused.py): returns
        the final norm of every row. The values are `DecoderLayer.forward`'s."""
        layers = self.model.layers
        normed, h = fused.add_rms_norm(h, None, layers[0].input_layernorm)
        for i, (layer, (k_cache, v_cache)) in enumerate(zip(layers, caches)):
            attended = layer.self_attn(normed, cos, sin, positions, kv_len, mask, k_cache, v_cache)
            normed, h = fused.add_rms_norm(attended, h, layer.post_attention_layernorm)
            following = layers[i + 1].input_layernorm if i + 1 < len(layers) else self.model.norm
            normed, h = fused.add_rms_norm(layer.mlp(normed), h, following)
        return normed
