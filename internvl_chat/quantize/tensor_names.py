"""The decoder linears' names: which the engine fuses (and from which slices of the fused weight),
which are quantized, and how the weight files name them."""

from __future__ import annotations

from ..engine.config import ModelConfig


def fused_parts(cfg: ModelConfig) -> dict[str, list[tuple[str, int, int]]]:
    """Per fused linear of a block: (piece, first, end) of the output rows each original linear holds."""
    t = cfg.text
    q, kv, f = t.q_size, t.kv_size, t.intermediate_size
    return {
        "self_attn.qkv_proj": [("self_attn.q_proj", 0, q), ("self_attn.k_proj", q, q + kv), ("self_attn.v_proj", q + kv, q + 2 * kv)],
        "self_attn.o_proj": [("self_attn.o_proj", 0, t.hidden_size)],
        "mlp.gate_up_proj": [("mlp.gate_proj", 0, f), ("mlp.up_proj", f, 2 * f)],
        "mlp.down_proj": [("mlp.down_proj", 0, t.hidden_size)],
    }


_FILE_NAMES = {".qkv_proj.": ".{q,k,v}_proj.", ".gate_up_proj.": ".{gate,up}_proj."}  # the engine fuses them


def weight_file_name(name: str) -> str:
    """A canonical name as the weight files spell it, a fused linear as its pieces (`.{q,k,v}_proj.`): one users can find."""
    for fused, pieces in _FILE_NAMES.items():  # the names the weight file uses
        name = name.replace(fused, pieces)
    return name


def is_quantized(name: str) -> bool:
    """A decoder linear's weight: the ones stored in 4 bits."""
    return name.startswith("language_model.model.layers.") and name.endswith("_proj.weight")
