"""TinyChat v2 checkpoints (llm-awq's `*-w4-g128-awq-v2.pt`, the original demo's format).

Their quantized linears carry `.qweight` (int16, interleaved), `.scales` and `.scaled_zeros`;
this module converts each one, as it streams past, into the AWQ GEMM triple the engine loads.
A q/k/v (or gate/up) stored fused is split back into its parts.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

import torch

from ..errors import CheckpointError
from ..quant.awq_format import tinychat_v2_to_awq
from .config import ModelConfig
from .tensor_reader import shown_value

V2_SUFFIXES = ("qweight", "scales", "scaled_zeros")
_LINEAR = re.compile(r"^(language_model\.model\.layers\.\d+\.(?:self_attn|mlp))\.(\w+)\.(qweight|scales|scaled_zeros)$")


def linear_shapes(cfg: ModelConfig) -> dict[str, list[tuple[str, int]]]:
    """For each linear name a TinyChat file may use: its parts and their output sizes."""
    t = cfg.text
    q, kv, f = t.q_size, t.kv_size, t.intermediate_size
    single = {"q_proj": q, "k_proj": kv, "v_proj": kv, "o_proj": t.hidden_size, "gate_proj": f, "up_proj": f, "down_proj": t.hidden_size}
    shapes = {name: [(name, n)] for name, n in single.items()}
    shapes["qkv_proj"] = [("q_proj", q), ("k_proj", kv), ("v_proj", kv)]
    shapes["gate_up_proj"] = [("gate_proj", f), ("up_proj", f)]
    return shapes


def in_features(cfg: ModelConfig, linear: str) -> int:
    t = cfg.text
    return {"o_proj": t.q_size, "down_proj": t.intermediate_size}.get(linear, t.hidden_size)


def convert_tinychat(tensors: Iterable[tuple[str, torch.Tensor]], cfg: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """Pass non-quantized tensors through; turn each v2 linear into `.qweight/.qzeros/.scales` parts."""
    shapes = linear_shapes(cfg)
    group = cfg.quant.group_size if cfg.quant else 128
    pending: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for name, tensor in tensors:
        m = _LINEAR.match(name)
        if not m:
            if name.endswith(".bias") and ".qkv_proj." in name:
                yield from _split_rows(name, tensor, shapes["qkv_proj"], "qkv_proj")
            else:
                yield name, tensor
            continue
        prefix, linear, suffix = m.groups()
        if linear not in shapes:
            yield name, tensor  # the model reports it as unexpected
            continue
        bag = pending.setdefault((prefix, linear), {})
        bag[suffix] = tensor
        if len(bag) < len(V2_SUFFIXES):
            continue
        del pending[(prefix, linear)]
        parts = shapes[linear]
        out_total = sum(n for _, n in parts)
        qweight, qzeros, scales = tinychat_v2_to_awq(
            bag["qweight"], bag["scales"], bag["scaled_zeros"], in_features(cfg, linear), out_total, group,
            name=shown_value(f"{prefix}.{linear}"),  # names from the file: escaped and cut short
        )
        start = 0
        for part, n in parts:
            cols = slice(start // 8, (start + n) // 8)
            yield f"{prefix}.{part}.qweight", qweight[:, cols].contiguous()
            yield f"{prefix}.{part}.qzeros", qzeros[:, cols].contiguous()
            yield f"{prefix}.{part}.scales", scales[:, start : start + n].contiguous()
            start += n
    if pending:
        (prefix, linear), bag = next(iter(pending.items()))
        lacking = [s for s in V2_SUFFIXES if s not in bag]
        raise CheckpointError(f"{shown_value(f'{prefix}.{linear}')} lacks {', '.join(lacking)} in the TinyChat file; the checkpoint is incomplete")


def _split_rows(name: str, tensor: torch.Tensor, parts: list[tuple[str, int]], fused: str) -> Iterator[tuple[str, torch.Tensor]]:
    total = sum(n for _, n in parts)
    if tuple(tensor.shape) != (total,):  # slicing a scalar raised IndexError; a short one gave short parts
        raise CheckpointError(
            f"tensor {shown_value(name)} has shape {tuple(tensor.shape)} but the config implies ({total},); "
            "config.json and the TinyChat file disagree"
        )
    start = 0
    for part, n in parts:
        yield name.replace(f".{fused}.", f".{part}."), tensor[start : start + n]
        start += n
