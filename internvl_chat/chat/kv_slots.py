"""What lets a Session be one of serve's KV slots: KV tensors of its own (`OwnKVCache`, swapped into
the model when the slot runs) and the length of the prefix its cache shares with a new request's ids.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def common_prefix_length(cached: Sequence[int], ids: Sequence[int]) -> int:
    """How many leading tokens `cached` and `ids` share."""
    n = min(len(cached), len(ids))
    i = 0
    while i + 256 <= n and list(cached[i : i + 256]) == list(ids[i : i + 256]):  # blocks first: prompts are long
        i += 256
    while i < n and cached[i] == ids[i]:
        i += 1
    return i


class OwnKVCache:
    """KV tensors (and the CUDA decode graphs captured over them) that one Session owns."""

    def __init__(self, model, share_model_cache: bool):
        lm = model.language_model
        if share_model_cache:
            self.k, self.v, self.graphs = lm.k_cache, lm.v_cache, model.decode_graphs
            return
        # zeros like the engine's own cache: a masked attention weight is 0, and 0 × garbage may be NaN
        self.k = [torch.zeros_like(t) for t in lm.k_cache]
        self.v = [torch.zeros_like(t) for t in lm.v_cache]
        self.graphs = None
        if model.decode_graphs is not None:
            from ..engine.cuda_graph import DecodeGraphs  # a graph captures tensor addresses: one set per cache

            step = model.compiled_step  # the compiled step, if any, reads whichever caches are active
            self.graphs = DecodeGraphs(model, step.masked if step is not None else None)

    def activate(self, model) -> None:
        lm = model.language_model
        lm.k_cache, lm.v_cache, model.decode_graphs = self.k, self.v, self.graphs

    @property
    def bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)
