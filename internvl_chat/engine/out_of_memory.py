"""Whether an error means the device or the host ran out of memory (torch raises several kinds)."""

from __future__ import annotations

import torch


def is_out_of_memory(error: BaseException) -> bool:
    """Whether `error` says the device or the host ran out of memory (the CPU allocator raises a
    plain RuntimeError "can't allocate memory"; Python's own allocations raise MemoryError; a CUDA
    allocation outside the caching allocator, e.g. a cuBLAS workspace, raises "CUDA error: out of
    memory", a torch.AcceleratorError)."""
    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and ("allocate memory" in text or "out of memory" in text)
