"""Our own AVX2 one-row linear (GEMV) kernels, and the library they are built into.

Inductor compiles the step's one-row linears into multiply-reduce loops with one vector
accumulator per weight row: each row's sum is a single chain of dependent additions, and a bf16
weight is converted inside that chain. `csrc/gemv_avx2.h` takes four rows a quarter of the
matrix apart at once, sharing each load of x, so that a large matrix is read from memory as four
long sequential streams (the last N % 4 rows: one at a time, four accumulators), converts
bf16 with one integer instruction per 8 weights, and splits large weights across threads. In
Inductor's step (measured interleaved in one process on a 2-vCPU Zen 3, benchmarks/RESULTS.md,
issue 10) the 0.5B shape decoded ×1.16–1.38 faster with it, before the four-row groups.

The library holds the operator `internvl_chat::gemv(weight, x)` (y = weight · x in float32; weight
a contiguous fp32 or bf16 matrix), which Inductor's step calls like any other operator, and the
whole C++ decode step (`internvl_chat.DecodeStep`, cpu_step.py). It is compiled once per source,
torch, compiler and flags with the C++ compiler Inductor already needs, into Inductor's cache
folder, and loaded from there afterwards. Where it cannot run (not x86-64, no AVX2/FMA) or be
built (no compiler), the step is Inductor's with its own loops.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

from .cpu_features import GEMV_FLAGS, cpu_flags, gemv_kernel

CSRC = Path(__file__).with_name("csrc")
# one library: the GEMV operator and the C++ decode step (cpu_step.py), which share the kernels
SOURCES = (CSRC / "gemv_avx2.cpp", CSRC / "decode_step.cpp")
HEADERS = (CSRC / "gemv_avx2.h", CSRC / "gemv_avx512.h")
OPERATOR = "internvl_chat::gemv"
DTYPES = (torch.float32, torch.bfloat16)  # weight dtypes the kernel reads
# -fopenmp: at::parallel_for's threads (served by torch's own libgomp, already loaded)
CXX_FLAGS = ("-O3", "-mavx2", "-mfma", "-fopenmp", "-std=c++20", "-shared", "-fPIC", "-w")
# torch's headers take ~20-40 s per source file to compile on a slow 2-core machine
BUILD_TIMEOUT_S = 600

_lock = threading.Lock()
_outcome: dict[str, str | None] = {}  # "failure": None once loaded, else why it is not; "kernel"


def loaded() -> bool:
    """Whether the operator is registered in this process."""
    return "failure" in _outcome and _outcome["failure"] is None


def failure() -> str | None:
    """Why the operator is not loaded (None when it is, or before anyone asked)."""
    return _outcome.get("failure")


def takes(weight: torch.Tensor) -> bool:
    """Whether a one-row linear with this weight calls the kernel (asked while tracing)."""
    return loaded() and weight.device.type == "cpu" and weight.dtype in DTYPES and weight.is_contiguous()


def kernel() -> str | None:
    """The kernels the four-row groups run ("avx2" or "avx512"), None while not loaded."""
    return _outcome.get("kernel")


def select(name: str) -> str:
    """Run the four-row groups with kernel `name` ("avx2", "avx512") where the library and the
    CPU have it (else they stay as they were); the name of those in use. For A/B runs and tests."""
    _outcome["kernel"] = torch.ops.internvl_chat.gemv_kernel(name)
    return _outcome["kernel"]


def supported() -> str | None:
    """None where the kernel can run on this machine, else why not."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"not an x86-64 CPU ({platform.machine()})"
    missing = [flag for flag in GEMV_FLAGS if flag not in cpu_flags()]
    return f"the CPU lacks {' and '.join(missing).upper()}" if missing else None


def ensure_loaded(cache_dir: Path) -> str | None:
    """Build (once per source, torch, compiler and flags) and load the operator; None on success,
    else the reason in one line. Later calls return the first call's outcome."""
    with _lock:
        if "failure" not in _outcome:
            reason = supported()
            if reason is None:
                try:
                    torch.ops.load_library(str(_build(cache_dir)))
                    _register_fake()
                    select(gemv_kernel())
                except Exception as e:  # noqa: BLE001 — any failure means "keep Inductor's loops"
                    reason = " ".join(str(e).split())[:300] or type(e).__name__
            _outcome["failure"] = reason
        return _outcome["failure"]


def _register_fake() -> None:
    # the shape and dtype of the result, for tracing: one float32 value per weight row
    @torch.library.register_fake(OPERATOR)
    def _(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x.new_empty(weight.shape[0], dtype=torch.float32)


def compiler() -> str:
    """$CXX when set (as Inductor reads it), else the first of c++, g++, clang++ found."""
    chosen = os.environ.get("CXX")
    for candidate in [chosen] if chosen else ["c++", "g++", "clang++"]:
        path = shutil.which(candidate)
        if path:
            return path
    raise RuntimeError(f"no C++ compiler: {chosen} not found" if chosen else "no C++ compiler found (install g++)")


def _build(cache_dir: Path) -> Path:
    """The compiled library in `cache_dir`/gemv, built now if it is not there yet (or damaged). The
    build goes to a temporary file first, so a concurrent process never loads a half-written one."""
    from torch.utils import cpp_extension

    cxx = compiler()
    flags = [*CXX_FLAGS, f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"]
    code = b"".join(path.read_bytes() for path in (*SOURCES, *HEADERS))
    key = hashlib.sha256(code + "|".join([torch.__version__, cxx, *flags]).encode()).hexdigest()[:16]
    folder = cache_dir / "gemv"
    library = folder / f"internvl_chat_gemv_{key}.so"
    # the library's digest as built: a damaged copy (cut short on disk) would crash dlopen with
    # SIGBUS rather than fail it, so only a library that matches its digest is loaded
    digest = library.with_suffix(".sha256")
    built = _digest_of(library)
    if built is not None and built == _read_digest(digest):
        return library
    folder.mkdir(parents=True, exist_ok=True)
    fd, partial = tempfile.mkstemp(dir=folder, prefix=".build-", suffix=".so")
    os.close(fd)
    command = [
        cxx, *flags, *(f"-I{p}" for p in cpp_extension.include_paths()), *map(str, SOURCES), "-o", partial,
        *(f"-L{p}" for p in cpp_extension.library_paths()), "-lc10", "-ltorch_cpu", "-lgomp",
    ]  # fmt: skip
    try:
        run = subprocess.run(command, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S, check=False)
        if run.returncode != 0:
            last = (run.stderr.strip().splitlines() or ["no output"])[-1]
            raise RuntimeError(f"{Path(cxx).name} failed: {last[:200]}")
        _write_digest(digest, _digest_of(Path(partial)))
        os.replace(partial, library)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return library


def _digest_of(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def _read_digest(path: Path) -> str | None:
    try:
        return path.read_text(encoding="ascii", errors="replace")[:64]
    except OSError:
        return None


def _write_digest(path: Path, value: str | None) -> None:
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    partial.write_text(value or "", encoding="ascii")
    os.replace(partial, path)
