"""A turn's peak memory, for the stats line: GPU memory on CUDA, else the process's resident size."""

from __future__ import annotations

import resource
import sys
from typing import Any


def peak_memory(device: Any) -> int | None:
    """Peak memory in bytes: allocated GPU memory on CUDA, else the process's peak resident size."""
    if str(device).startswith("cuda"):
        import torch

        return int(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # Linux reports KiB, macOS bytes


def reset_peak_memory(device: Any) -> None:
    """Start a new GPU peak for the next turn (the process peak on CPU cannot be reset)."""
    if str(device).startswith("cuda"):
        import torch

        torch.cuda.reset_peak_memory_stats(device)
