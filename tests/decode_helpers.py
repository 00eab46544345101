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


def forced_steps(model, ids: list[int], tokens: list[int]) -> torch.Tensor:
    """Prefill `ids`, then feed `tokens` (another run's greedy tokens) one at a time: each step's
    logits, as `greedy_steps` gives them, comparable even where a near tie in 16-bit logits would
    send greedy decoding down another path."""
    model.forward(ids, 0)
    rows = [model.forward([token], pos).clone() for pos, token in enumerate(tokens, start=len(ids))]
    return torch.stack(rows)
