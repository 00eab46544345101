"""Quantizing the decoder block by block: AWQ's scales searched and folded into the preceding norm
(or linear), clip ranges searched, then every linear quantized per group and packed in the AWQ GEMM
layout; RTN only the last step.

Only one decoder block's activations are alive at a time, next to the model itself. The scale
statistics (mean|x|) and the clip search use every calibration token, but the α-grid losses (20
forward passes of a module per group of linears) are measured on at most SEARCH_TOKENS tokens."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import torch

from ..engine.language import DecoderLayer, Qwen2ForCausalLM
from ..engine.loader import LoadedModel
from ..errors import UsageError
from ..quant.awq_format import dequantize_awq, quantize_rtn
from .activations import collect_linear_inputs, first_block_inputs, run_attention, spread_rows
from .calibration import Sample
from .checks import check_group_size
from .progress import Progress
from .search import group_grams, linear_error, search_clip, search_scales
from .tensor_names import fused_parts

SEARCH_TOKENS = 2048  # tokens behind each α-grid loss (AutoAWQ's clip search uses 512)
AWQ_STEPS = ("collecting inputs", "scales q/k/v", "scales gate/up", "scales down", "clip ranges", "packing")


def awq_block(lm: Qwen2ForCausalLM, layer: DecoderLayer, inputs: list[torch.Tensor], group_size: int, clip: bool,
              detail: Callable[[str], None] = lambda _: None) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], list[torch.Tensor]]:  # fmt: skip
    """AWQ for one decoder block, in place: search and fold the scales, then search clip ranges.
    Returns the clip ranges per fused linear and the block's float outputs (the next block's inputs)."""
    attn, mlp = layer.self_attn, layer.mlp
    detail(AWQ_STEPS[0])
    x, outputs = collect_linear_inputs(lm, layer, inputs)

    # q/k/v share the input norm. Error: the attention module's output over whole sequences
    # (RoPE and softmax see the rounding), on the first samples up to SEARCH_TOKENS tokens.
    detail(AWQ_STEPS[1])
    lengths = [h.shape[1] for h in inputs]
    count = max(1, sum(1 for total in itertools.accumulate(lengths) if total <= SEARCH_TOKENS))
    sequences = [seq[None] for seq in x["qkv"][: sum(lengths[:count])].split(lengths[:count])]
    reference = [run_attention(lm, attn, seq) for seq in sequences]

    def attention_error() -> torch.Tensor:
        err = sum((run_attention(lm, attn, seq) - ref).float().pow(2).sum() for seq, ref in zip(sequences, reference))
        return err / sum(ref.numel() for ref in reference)

    s_qkv = search_scales(attn.qkv_proj, x["qkv"], attention_error, group_size)
    _fold(layer.input_layernorm.weight, [attn.qkv_proj.weight], s_qkv)

    # gate/up share the post-attention norm. Error: the MLP's output (SiLU and down_proj included)
    detail(AWQ_STEPS[2])
    rows = spread_rows(x["gate_up"], SEARCH_TOKENS)
    mlp_reference = mlp(rows)
    s_gate_up = search_scales(mlp.gate_up_proj, x["gate_up"], lambda: (mlp(rows) - mlp_reference).float().pow(2).mean(), group_size)
    _fold(layer.post_attention_layernorm.weight, [mlp.gate_up_proj.weight], s_gate_up)

    # down's input is up's output (folding the gate/up scales left it unchanged). Error: its own output
    detail(AWQ_STEPS[3])
    down_reference = mlp.down_proj.weight.data.clone()
    down_rows = spread_rows(x["down"], SEARCH_TOKENS)
    s_down = search_scales(mlp.down_proj, x["down"], linear_error(down_rows, down_reference, mlp.down_proj), group_size)
    up_rows = mlp.gate_up_proj.weight.data[mlp.intermediate_size :]
    up_rows.div_(s_down.to(up_rows.dtype)[:, None])
    mlp.down_proj.weight.data.mul_(s_down.to(mlp.down_proj.weight.dtype))
    # o_proj's input is v_proj's output; with grouped-query attention (all InternVL3 sizes) the
    # shapes differ and AWQ leaves it unscaled, as AutoAWQ does

    clips: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    if clip:  # on the scaled weights, with the inputs they now see (x / s)
        detail(AWQ_STEPS[4])
        # q/k/v keep their full range: the attention scores are sensitive to it (AutoAWQ skips q and
        # k; clipping v too measured 0.4 points lower on the demo model's eval, over three seeds)
        inputs_now = {"self_attn.o_proj": x["o"], "mlp.gate_up_proj": x["gate_up"] / s_gate_up.to(x["gate_up"].dtype),
                      "mlp.down_proj": x["down"] / s_down.to(x["down"].dtype)}  # fmt: skip
        for name, rows_now in inputs_now.items():
            clips[name] = search_clip(layer.get_submodule(name).weight.data, group_grams(rows_now, group_size), group_size)
    return clips, outputs


def _fold(prev_weight: torch.Tensor, weights: Sequence[torch.Tensor], s: torch.Tensor) -> None:
    prev_weight.data.div_(s.to(prev_weight.dtype))
    for w in weights:
        w.data.mul_(s.to(w.dtype))


def quantize_model(
    loaded: LoadedModel,
    samples: Sequence[Sample],
    method: str = "awq",
    group_size: int = 128,
    clip: bool = True,
    progress: Progress | None = None,
) -> dict[str, torch.Tensor]:
    """Quantize the decoder linears in place (weights become their 4-bit round trip, AWQ scales are
    folded into the norms) and return the packed AWQ tensors under canonical checkpoint names."""
    if method not in ("awq", "rtn"):
        raise UsageError(f"unknown method {method!r}; use awq or rtn")
    progress = progress or Progress()
    model, cfg = loaded.model, loaded.config
    if cfg.quant is not None:
        raise UsageError("the source checkpoint is already quantized; quantize a 16-bit checkpoint")
    group_size = check_group_size(cfg, group_size)
    lm = model.language_model
    layers = lm.model.layers
    parts = fused_parts(cfg)
    packed: dict[str, torch.Tensor] = {}
    inputs: list[torch.Tensor] = []
    if method == "awq":
        with progress.phase("calibration forward", len(samples), "samples") as step:
            inputs = first_block_inputs(loaded, samples, step)
    name = "AWQ search" if method == "awq" else "RTN"
    with torch.inference_mode(), progress.phase(name, len(layers), "blocks") as step:
        for index, layer in enumerate(layers):
            where = f"block {index + 1}/{len(layers)}"
            clips: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
            if method == "awq":
                clips, inputs = awq_block(lm, layer, inputs, group_size, clip, lambda what: step(0, f"{where}: {what}"))
                step(0, f"{where}: {AWQ_STEPS[-1]}")
            prefix = f"language_model.model.layers.{index}"
            for fused, pieces in parts.items():
                linear = layer.get_submodule(fused)
                w = linear.weight.data
                clip_max, clip_min = (c.t().contiguous() for c in clips[fused]) if fused in clips else (None, None)
                qweight, qzeros, scales = quantize_rtn(w.t(), group_size, clip_max, clip_min)
                linear.weight.data = dequantize_awq(qweight, qzeros, scales, group_size, dtype=w.dtype).t().contiguous()
                for piece, start, end in pieces:
                    packed[f"{prefix}.{piece}.qweight"] = qweight[:, start // 8 : end // 8].contiguous().cpu()
                    packed[f"{prefix}.{piece}.qzeros"] = qzeros[:, start // 8 : end // 8].contiguous().cpu()
                    packed[f"{prefix}.{piece}.scales"] = scales[:, start:end].contiguous().cpu()
            step(1, where)
    return packed
