"""The AVX2 GEMV kernel (engine/cpu_gemv.py, engine/csrc/gemv_avx2.cpp) against float64 products
(and its AVX-512 variant, gemv_avx512.h, where the CPU has AVX-512F: against float64 and AVX2),
and its place in Inductor's compiled step: every one-row linear calls it while tracing, and a
kernel that cannot be built (nor, then, the C++ step of cpu_step.py) leaves the step compiled with
Inductor's own loops and one note.

Cost: one build of the kernel per machine (~20-40 s, then kept in Inductor's cache folder, which
the compiled-step tests share); the fallback test starts one process that loads the cached step.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from internvl_chat.engine import compiled, cpu_features, cpu_gemv
from internvl_chat.engine.loader import load_model

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(cpu_gemv.supported() is not None, reason=f"the kernel cannot run here: {cpu_gemv.supported()}")


@pytest.fixture(scope="module")
def kernel():
    failure = cpu_gemv.ensure_loaded(compiled.use_cache_dir())
    assert failure is None, failure
    return torch.ops.internvl_chat.gemv


def _check(kernel, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    got = kernel(weight, x)
    assert got.dtype == torch.float32 and got.shape == (weight.shape[0],)
    want = weight.double() @ x.double()
    # float32 sums of float32 products: error well under 1e-5 of the sum of magnitudes
    bound = 1e-5 * (weight.double().abs() @ x.double().abs()) + 1e-30
    assert ((got.double() - want).abs() <= bound).all(), (got.double() - want).abs().max()
    return got


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [1, 2, 7, 8, 15, 16, 17, 31, 32, 33, 47, 192, 896, 4867])
def test_every_row_length_and_tail(kernel, dtype, k):
    gen = torch.Generator().manual_seed(k)
    for n in (1, 3, 5, 37):
        weight = torch.randn(n, k, generator=gen).to(dtype)
        _check(kernel, weight, torch.randn(k, generator=gen))


@pytest.mark.parametrize(
    "n, k_fp32, k_bf16",
    [(2400, 640, 640), (1203, 1000, 1600), (7, 40_000, 40_000)],
    ids=["short-rows", "long-rows-and-three-left", "a-quarter-of-one-row"],  # N % 4 == 0, 3, 3
)
def test_large_weights_split_across_threads_give_the_same_values(kernel, n, k_fp32, k_bf16):
    """Several threads' worth of rows, four at a time a quarter of the matrix apart: each row is
    summed the same way whichever thread takes it (the last N % 4 rows go one at a time)."""
    gen = torch.Generator().manual_seed(n)
    for dtype, k in ((torch.float32, k_fp32), (torch.bfloat16, k_bf16)):
        weight = torch.randn(n, k, generator=gen).to(dtype)
        x = torch.randn(k, generator=gen)
        before = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            one = _check(kernel, weight, x)
            torch.set_num_threads(2)
            two = _check(kernel, weight, x)
        finally:
            torch.set_num_threads(before)
        assert torch.equal(one, two)


def test_x_may_be_a_strided_view(kernel):
    weight, x = torch.randn(9, 20), torch.randn(40)[::2]
    assert not x.is_contiguous()
    _check(kernel, weight, x)


@pytest.mark.parametrize(
    "weight, x",
    [
        (torch.randn(4, 8), torch.randn(8, dtype=torch.float64)),  # x not float32
        (torch.randn(4, 8), torch.randn(7)),  # one value short
        (torch.randn(8, 4).t(), torch.randn(8)),  # weight not contiguous
        (torch.randn(4, 8, dtype=torch.float16), torch.randn(8)),  # a dtype it does not read
        (torch.randn(2, 4, 8), torch.randn(8)),  # not a matrix
    ],
)
def test_wrong_arguments_are_refused(kernel, weight, x):
    with pytest.raises(RuntimeError, match="gemv"):
        kernel(weight, x)


def test_takes_only_what_it_reads(kernel):
    assert cpu_gemv.takes(torch.empty(4, 8)) and cpu_gemv.takes(torch.empty(4, 8, dtype=torch.bfloat16))
    assert not cpu_gemv.takes(torch.empty(4, 8, dtype=torch.float16))
    assert not cpu_gemv.takes(torch.empty(8, 4).t())


def test_every_one_row_linear_of_the_step_calls_it(kernel, tiny_original):
    """Traced as the compiled step is (language.linear while compiling): qkv, o, gate/up and down in
    every layer, and lm_head, are the kernel; nothing else multiplies a weight."""
    loaded = load_model(tiny_original, device="cpu", dtype="float32", max_context=64, compile="off")
    lm = loaded.model.language_model
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    step = torch.compile(type(lm).decode_exact, backend=record, fullgraph=True, dynamic=True)
    with torch.inference_mode():
        got = step(lm, torch.tensor([5]), 2, None)
        want = lm.decode_exact(torch.tensor([5]), 2)
    calls = [node for gm in graphs for node in gm.graph.nodes if node.op == "call_function"]
    op = torch.ops.internvl_chat.gemv
    gemvs = [node for node in calls if node.target in (op, op.default)]
    assert len(gemvs) == 4 * loaded.config.text.num_layers + 1
    assert not any(node.target in (torch.nn.functional.linear, torch._C._nn.linear) for node in calls)
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)


def test_compiler_follows_cxx(monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-g++"))
    with pytest.raises(RuntimeError, match="no C\\+\\+ compiler: .*no-such-g\\+\\+ not found"):
        cpu_gemv.compiler()


def test_a_kernel_that_does_not_build_leaves_inductors_loops_and_one_note(kernel, tiny_original, tmp_path):
    """The kernel's source fails to compile (a stand-in for a broken toolchain); the step still
    compiles, from Inductor's cache, and answers as the eager step does."""
    broken = tmp_path / "gemv_avx2.cpp"
    broken.write_text("#error a compiler that cannot build the kernel\n")  # the C++ step cannot load either
    code = (
        "import json, torch\n"
        "from internvl_chat.engine import cpu_gemv\n"
        f"cpu_gemv.SOURCES = (__import__('pathlib').Path({str(broken)!r}),)\n"
        "from internvl_chat.engine.loader import load_model\n"
        "from decode_helpers import greedy_steps\n"
        "ids = list(range(5, 30))\n"
        "tokens = []\n"
        "for mode in ('off', 'on'):\n"
        f"    m = load_model({str(tiny_original)!r}, device='cpu', dtype='float32', max_context=1024, compile=mode).model\n"
        "    tokens.append(greedy_steps(m, ids, 12)[0])\n"
        "print(json.dumps([m.compiled_step is not None, cpu_gemv.loaded(), tokens[0] == tokens[1]]))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")]),
           "TORCHINDUCTOR_CACHE_DIR": str(compiled.use_cache_dir())}  # fmt: skip
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=900)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split("\n")[-2] == "[true, false, true]", run.stdout
    notes = [line for line in run.stderr.splitlines() if "GEMV" in line]
    assert len(notes) == 1 and "the AVX2 GEMV kernel was not built" in notes[0] and "failed" in notes[0], run.stderr


def test_a_damaged_cached_library_is_built_again(tmp_path):
    """A library in the cache that no longer loads (cut short on disk) is rebuilt, not reported
    as a failure at every start (a fresh process: the operator loads once per process)."""
    code = (
        "from pathlib import Path\n"
        "from internvl_chat.engine import cpu_gemv\n"
        f"cache = Path({str(tmp_path)!r})\n"
        "assert cpu_gemv._build(cache).is_file()\n"
        "library = cpu_gemv._build(cache)\n"  # already there: the same file
        "library.write_bytes(library.read_bytes()[:4096])\n"
        "print(cpu_gemv.ensure_loaded(cache), cpu_gemv.loaded(), library.stat().st_size > 4096)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=900)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["None", "True", "True"], run.stdout


HAS_AVX512 = cpu_gemv.supported() is None and all(f in cpu_features.cpu_flags() for f in cpu_features.GEMV_AVX512_FLAGS)
needs_avx512 = pytest.mark.skipif(not HAS_AVX512, reason="the CPU lacks AVX-512F")


@pytest.fixture
def kernels(kernel):
    """The operator, with a function to switch its four-row kernels; the default chosen again after."""
    yield kernel, cpu_gemv.select
    cpu_gemv.select(cpu_features.gemv_kernel())


@needs_avx512
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [1, 15, 16, 17, 31, 32, 33, 47, 48, 63, 64, 65, 896, 4867])
def test_the_avx512_kernel_against_float64_and_avx2(kernels, dtype, k):
    """Every remainder of 32 and 16 weights, each row count mod 4: within float32 tolerance of the
    float64 product, and of the AVX2 kernel."""
    kernel, select = kernels
    gen = torch.Generator().manual_seed(1000 + k)
    for n in (1, 4, 7, 37, 400):
        weight = torch.randn(n, k, generator=gen).to(dtype)
        x = torch.randn(k, generator=gen)
        assert select("avx512") == "avx512"
        wide = _check(kernel, weight, x)
        assert select("avx2") == "avx2"
        narrow = _check(kernel, weight, x)
        scale = weight.double().abs() @ x.double().abs()
        assert ((wide.double() - narrow.double()).abs() <= 2e-5 * scale + 1e-30).all()


@needs_avx512
def test_the_avx512_kernel_gives_the_same_values_on_any_thread_count(kernels):
    kernel, select = kernels
    gen = torch.Generator().manual_seed(7)
    before = torch.get_num_threads()
    try:
        assert select("avx512") == "avx512"
        for dtype, n, k in ((torch.float32, 1203, 1000), (torch.bfloat16, 2400, 640)):
            weight, x = torch.randn(n, k, generator=gen).to(dtype), torch.randn(k, generator=gen)
            torch.set_num_threads(1)
            one = _check(kernel, weight, x)
            torch.set_num_threads(2)
            assert torch.equal(one, _check(kernel, weight, x))
    finally:
        torch.set_num_threads(before)


@needs_avx512
def test_this_cpu_runs_the_avx512_kernel(kernel):
    assert cpu_features.gemv_kernel() == "avx512" and cpu_gemv.kernel() == "avx512"


def test_the_kernel_follows_the_cpus_flags(monkeypatch):
    flags = cpu_features.cpu_flags()
    monkeypatch.setattr(cpu_features, "cpu_flags", lambda: (flags - {"avx512f"}) | {"avx2", "fma"})
    assert cpu_features.gemv_kernel() == "avx2"
    monkeypatch.setattr(cpu_features, "cpu_flags", lambda: flags | {"avx2", "fma", "avx512f"})
    assert cpu_features.gemv_kernel() == "avx512"


def test_a_cpu_without_avx512_loads_the_avx2_kernel():
    """A fresh process whose CPU flags lack AVX-512F: the library loads with the AVX2 kernels."""
    code = (
        "from internvl_chat.engine import compiled, cpu_features, cpu_gemv\n"
        "flags = cpu_features.cpu_flags() - {'avx512f'}\n"
        "cpu_features.cpu_flags = lambda: flags\n"
        "print(cpu_gemv.ensure_loaded(compiled.use_cache_dir()), cpu_gemv.kernel())\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "TORCHINDUCTOR_CACHE_DIR": str(compiled.use_cache_dir())}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=900)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["None", "avx2"], run.stdout
