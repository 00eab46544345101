"""Random AWQ GEMM-packed tensors (qweight, qzeros, scales), as the int4 tests feed the quant code."""

from __future__ import annotations

import torch


def random_awq(in_features, out_features, group_size=128, seed=0, device="cpu"):
    """Every nibble random (the whole int32 range) and small positive float16 scales, the same for a seed."""
    g = torch.Generator().manual_seed(seed)
    qweight = torch.randint(-(2**31), 2**31 - 1, (in_features, out_features // 8), dtype=torch.int32, generator=g)
    qzeros = torch.randint(-(2**31), 2**31 - 1, (in_features // group_size, out_features // 8), dtype=torch.int32, generator=g)
    scales = (torch.rand(in_features // group_size, out_features, generator=g) * 0.02 + 0.001).half()
    return qweight.to(device), qzeros.to(device), scales.to(device)
