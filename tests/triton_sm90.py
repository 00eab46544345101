"""Compile a Triton kernel for an H100 (sm_90) on this CPU with Triton's real compiler (not the
interpreter), to read its PTX: a check of the code the GPU will run, without a GPU."""

from __future__ import annotations

import inspect

import pytest


def compile_for_sm90(kernel, types: dict[str, str], constants: dict, num_warps: int, aligned_ints: tuple[str, ...] = ()):
    """`kernel` (a triton.JITFunction) compiled for sm_90; `types` gives each runtime argument's
    Triton type, the rest are the `constants`. Pointers (and `aligned_ints`) are declared 16-byte
    aligned, as Triton specializes them at launch. Skips where this Triton or toolchain cannot."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler.errors import CompilationError

    params = list(inspect.signature(kernel.fn).parameters)
    signature = {p: types.get(p, "constexpr") for p in params}
    aligned = {(params.index(p),): [["tt.divisibility", 16]] for p, t in types.items() if t.startswith("*") or p in aligned_ints}
    try:
        source = ASTSource(fn=kernel, signature=signature, attrs=aligned,
                           constexprs={(params.index(k),): v for k, v in constants.items()})  # fmt: skip
    except TypeError as e:
        pytest.skip(f"this Triton's ASTSource takes other arguments: {e}")
    try:
        return triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
    except CompilationError:
        raise
    except Exception as e:  # the toolchain (ptxas) rather than our source
        pytest.skip(f"Triton cannot build CUDA code on this machine: {type(e).__name__}: {str(e)[:200]}")
