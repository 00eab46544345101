"""The calibration samples through the decoder, one block at a time: the input of block 0, each
block run over whole sequences from position 0, and the rows each of its linears is fed."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..engine.language import Attention, DecoderLayer, Qwen2ForCausalLM
from ..engine.loader import LoadedModel
from .calibration import Sample
from .progress import Step, no_step


def first_block_inputs(loaded: LoadedModel, samples: Sequence[Sample], step: Step = no_step) -> list[torch.Tensor]:
    """Token embeddings (image features in place) for each sample: the input of decoder block 0."""
    model = loaded.model
    out = []
    with torch.inference_mode():
        for s in samples:
            features = model.encode_images(s.pixel_values) if s.pixel_values is not None else None
            # cut to the model's positions (a short-context model): RoPE tables end there
            out.append(model.embed(torch.tensor(s.ids, device=model.device), features)[:, : model.max_seq_len])
            step()
    return out


def _scratch_kv(lm: Qwen2ForCausalLM, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (1, lm.cfg.num_kv_heads, h.shape[1], lm.cfg.head_dim)
    return torch.empty(shape, device=h.device, dtype=h.dtype), torch.empty(shape, device=h.device, dtype=h.dtype)


def run_block(lm: Qwen2ForCausalLM, layer: DecoderLayer, h: torch.Tensor) -> torch.Tensor:
    """A decoder block over a whole sequence from position 0, with a private K/V scratch cache."""
    t = h.shape[1]
    positions = torch.arange(t, device=h.device)
    return layer(h, lm.cos[:t], lm.sin[:t], positions, t, "causal", *_scratch_kv(lm, h))


def run_attention(lm: Qwen2ForCausalLM, attn: Attention, x: torch.Tensor) -> torch.Tensor:
    """The attention module (q/k/v, RoPE, causal attention, o_proj) over a normed sequence from position 0."""
    t = x.shape[1]
    positions = torch.arange(t, device=x.device)
    return attn(x, lm.cos[:t], lm.sin[:t], positions, t, "causal", *_scratch_kv(lm, x))


def collect_linear_inputs(lm, layer, inputs) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
    """Rows fed to each of the block's linears, concatenated over the calibration samples, and the
    block's outputs (the next block's inputs)."""
    rows: dict[str, list[torch.Tensor]] = {"qkv": [], "o": [], "gate_up": [], "down": []}
    modules = {"qkv": layer.self_attn.qkv_proj, "o": layer.self_attn.o_proj, "gate_up": layer.mlp.gate_up_proj, "down": layer.mlp.down_proj}
    hooks = [m.register_forward_hook(lambda _m, args, _o, key=key: rows[key].append(args[0].reshape(-1, args[0].shape[-1])))
             for key, m in modules.items()]  # fmt: skip
    try:
        outputs = [run_block(lm, layer, h) for h in inputs]
    finally:
        for hook in hooks:
            hook.remove()
    return {k: torch.cat(v) for k, v in rows.items()}, outputs


def spread_rows(x: torch.Tensor, limit: int) -> torch.Tensor:
    """At most `limit` rows of x, evenly spaced (every sample contributes)."""
    if x.shape[0] <= limit:
        return x
    return x[torch.linspace(0, x.shape[0] - 1, limit, device=x.device).long()]
