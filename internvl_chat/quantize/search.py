"""AWQ's searches (the losses and grids of AutoAWQ): per-input-channel scales s = mean|x|^α with α
on a grid in [0, 1], and per-group clip ranges, each judged by the output error of the weights'
4-bit round trip (`fake_quantize`, the quantizer's formula without packing).

The clip error goes through per-group Gram matrices X_gᵀX_g (all groups of a weight searched at
once, all rows at the cost of a few), and a linear's own output error too where that is cheaper."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ..quant.awq_format import SCALE_MIN

ALPHA_GRID = 20  # α = 0, 1/20, … , 19/20 (as AutoAWQ)
CLIP_GRID = 20
CLIP_MAX_SHRINK = 0.5  # try clipping each group's range down to half (as AutoAWQ)


def fake_quantize(weight_out_in: torch.Tensor, group_size: int, clip: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """The weight after the 4-bit round trip of `quantize_rtn` (the same formula, without packing),
    nn.Linear layout in and out; `clip` = (max, min) per [output, group] replaces the group range."""
    n, k = weight_out_in.shape
    w = weight_out_in.float().reshape(n, k // group_size, group_size)
    w_max, w_min = clip if clip is not None else (w.amax(dim=-1), w.amin(dim=-1))
    scale = ((w_max - w_min) / 15).clamp(min=SCALE_MIN).half().float().unsqueeze(-1)
    zero = (-torch.round(w_min.unsqueeze(-1) / scale)).clamp(0, 15)
    q = (torch.round(w / scale) + zero).clamp(0, 15)
    return ((q - zero) * scale).reshape(n, k).to(weight_out_in.dtype)


def awq_scales(x_mean: torch.Tensor, alpha: float) -> torch.Tensor:
    """s = mean|x|^α, normalised so that max·min = 1 (as AutoAWQ)."""
    scales = x_mean.pow(alpha).clamp(min=1e-4)
    return scales / (scales.max() * scales.min()).sqrt()


def search_scales(linear: torch.nn.Linear, x: torch.Tensor, error: Callable[[], torch.Tensor], group_size: int) -> torch.Tensor:
    """The per-input-channel scales on the α grid whose 4-bit round trip of `linear` gives the least
    `error()` (measured with the linear's weight temporarily replaced)."""
    x_mean = x.abs().float().mean(dim=0)
    original = linear.weight.data
    best_err, best_scales = math.inf, torch.ones_like(x_mean)
    try:
        for step in range(ALPHA_GRID):
            scales = awq_scales(x_mean, step / ALPHA_GRID)
            s = scales.to(original.dtype)
            linear.weight.data = fake_quantize(original * s, group_size) / s
            err = float(error())
            if err < best_err:
                best_err, best_scales = err, scales
    finally:
        linear.weight.data = original
    return best_scales


def linear_error(x: torch.Tensor, reference: torch.Tensor, linear: torch.nn.Linear, calls: int = ALPHA_GRID) -> Callable[[], torch.Tensor]:
    """Mean squared output error of `linear` (its current weight) against `reference`'s on rows x,
    for `calls` evaluations. Through the Gram matrix XᵀX when that costs fewer operations (few input
    channels: the demo model), else row by row (wide inputs: down_proj of real models); same value."""
    rows, k = x.shape
    n = reference.shape[0]
    if rows * k * k + calls * n * k * k < calls * rows * k * n:
        gram = (x.t().float() @ x.float()) / rows  # [K, K]

        def through_gram() -> torch.Tensor:
            delta = linear.weight.float() - reference.float()  # [N, K]
            return ((delta @ gram) * delta).sum() / delta.shape[0]

        return through_gram

    def row_by_row() -> torch.Tensor:
        return (x @ (linear.weight - reference).t()).float().pow(2).mean()

    return row_by_row


def group_grams(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """Per input group g: X_gᵀX_g / rows, [G, g, g] — all the clip search needs to know about the inputs."""
    xg = x.float().view(x.shape[0], -1, group_size).transpose(0, 1)  # [G, R, g]
    return xg.transpose(1, 2) @ xg / x.shape[0]


def search_clip(weight_out_in: torch.Tensor, grams: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (output, group) range shrink with the least squared partial-output error, vectorised over
    all groups: for weight error d of a group, the error over all calibration rows is d·C_g·dᵀ.
    Returns (max, min) [N, G]; the first grid point is the unclipped range, so it never does worse."""
    n, k = weight_out_in.shape
    w = weight_out_in.float().view(n, k // group_size, group_size)
    w_max, w_min = w.amax(dim=-1), w.amin(dim=-1)  # [N, G]
    best_max, best_min = w_max.clone(), w_min.clone()
    best_err = torch.full_like(w_max, math.inf)
    for step in range(int(CLIP_MAX_SHRINK * CLIP_GRID)):
        ratio = 1 - step / CLIP_GRID
        c_max, c_min = w_max * ratio, w_min * ratio
        d = fake_quantize(w.view(n, k), group_size, (c_max, c_min)).view(n, -1, group_size) - w
        err = (torch.einsum("ngk,gkl->ngl", d, grams) * d).sum(dim=-1)  # [N, G]
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_max = torch.where(better, c_max, best_max)
        best_min = torch.where(better, c_min, best_min)
    return best_max, best_min
