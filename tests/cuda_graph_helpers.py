"""Capturing one call in a CUDA graph, as the engine's decode graphs do (tests marked `cuda`)."""

from __future__ import annotations

from collections.abc import Callable

import torch


def warm_then_capture(call: Callable[[], torch.Tensor]) -> tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]:
    """Run `call` once on a side stream (kernels compile and autotune outside the graph), then
    capture one call; returns (graph, the captured call's output, the warm-up's output)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        warm = call()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = call()
    return graph, out, warm
