"""Greedy decoding one step at a time, the way the streaming generator drives the model."""

from __future__ import annotations

import torch


def greedy_steps(model, ids: list[int], steps: int) -> tuple[list[int], torch.Tensor]:
    """Prefill `ids`, then `steps` one-token forwards: the greedy tokens and each step's logits."""
    logits = model.forward(ids, 0)
    tokens, rows = [], []
    pos = len(ids)
    for _ in range(steps):
        token = logits.argmax().view(1)
        tokens.append(int(token))
        logits = model.forward(token, pos)
        rows.append(logits.clone())  # the model may reuse its output buffer (CUDA graphs)
        pos += 1
    return tokens, torch.stack(rows)
