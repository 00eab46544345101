"""Runs Int4Linear's gemlite backend on the CPU under Triton's interpreter, in a process of its own.

Used by tests/test_gemlite.py: `python tests/gemlite_interpreter.py CASES_JSON` prints one JSON
result per case; `... --model FOLDER` loads a 4-bit checkpoint with int4 backend gemlite and with
dequant and compares their logits (a prefill, then one-token steps). A process of its own because the interpreter must be switched on before triton is
imported, and because GemLite needs a stand-in CUDA device and Triton driver:
- GemLite reads the GPU's compute capability, name and SM count when it is imported
  (gemlite/triton_kernels/utils.py, core.py), which fails without CUDA; those reads get fixed
  values during the import only (capability 9.0: native bf16 atomics, as on an H100/H200);
- Triton has no active driver without a GPU, and GemLite asks it for the target (HIP or not) and the
  shared memory size; the autotuner asks it for a benchmarker. The stand-in times every config
  alike, so the first config that GemLite's pruning keeps is used.
Each case compares against its own nibble-by-nibble reference, not the package's dequantize code.
"""

from __future__ import annotations

import json
import os
import sys
import types
from pathlib import Path
from unittest import mock

os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # SPEC §2


class _StandInDriver:
    utils = types.SimpleNamespace(get_device_properties=lambda device: {"max_shared_mem": 232448})

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_benchmarker(self):
        return lambda kernel_call, quantiles: [1.0 for _ in quantiles]


def import_gemlite():
    driver.set_active(_StandInDriver())
    device = types.SimpleNamespace(name="triton interpreter", multi_processor_count=8)
    with (
        mock.patch.object(torch.cuda, "get_device_capability", lambda *a, **k: (9, 0)),
        mock.patch.object(torch.cuda, "get_device_properties", lambda *a, **k: device),
    ):
        import gemlite
    return gemlite


def ref_weight(qweight, qzeros, scales, group_size, scale_dtype):
    """W [K, N] = (q − z)·s, nibble by nibble, in the kernel's dtype (returned as float32)."""

    def nibbles(packed):
        out = torch.empty(packed.shape[0], packed.shape[1] * 8, dtype=torch.int32)
        for s in range(8):
            out[:, ORDER[s] :: 8] = (packed >> (4 * s)) & 0xF
        return out.float()

    z = nibbles(qzeros).repeat_interleave(group_size, dim=0)
    s = scales.to(scale_dtype).float().repeat_interleave(group_size, dim=0)
    return ((nibbles(qweight) - z) * s).to(scale_dtype).float()


def run_case(case, gemlite):
    from internvl_chat.quant.int4_linear import Int4Linear

    k, n, group, rows = case["in"], case["out"], case["group"], case["rows"]
    dtype = getattr(torch, case["dtype"])
    g = torch.Generator().manual_seed(case.get("seed", 0))
    qweight = torch.randint(-(2**31), 2**31 - 1, (k, n // 8), dtype=torch.int32, generator=g)
    qzeros = torch.randint(-(2**31), 2**31 - 1, (k // group, n // 8), dtype=torch.int32, generator=g)
    scales = (torch.rand(k // group, n, generator=g) * 0.02 + 0.001).half()
    bias = torch.randn(n, generator=g) if case.get("bias") else None
    layer = Int4Linear.from_awq(qweight, qzeros, scales, bias=bias, group_size=group, backend="gemlite", dtype=dtype, device="cpu")
    kernel_dtype = layer.gemlite_dtype
    w_ref = ref_weight(qweight, qzeros, scales, group, kernel_dtype)
    x = torch.randn(*case.get("lead", []), rows, k, generator=g).to(dtype)

    calls = []
    original = gemlite.forward_functional

    def counting(*args, **kwargs):
        calls.append(args[0].shape[0])
        return original(*args, **kwargs)

    with mock.patch.object(gemlite, "forward_functional", counting):
        y = layer(x)
    ref = x.float() @ w_ref + (bias.float() if bias is not None else 0)
    err = (y.float() - ref).norm() / ref.norm() if ref.numel() else torch.tensor(0.0)
    dense = layer.dequantized_weight_out_in(torch.float32).t()
    return {
        "case": case,
        "backend": layer.backend,
        "kernel_dtype": str(kernel_dtype).removeprefix("torch."),
        "shape": list(y.shape),
        "dtype": str(y.dtype).removeprefix("torch."),
        "finite": bool(torch.isfinite(y).all()),
        "rel_err": err.item(),
        "kernel_calls": len(calls),
        "weight_exact": bool(torch.equal(dense, w_ref)),
        "memory_bytes": layer.memory_bytes(),
    }


def compare_model(folder, gemlite):
    from internvl_chat.engine.loader import load_model

    prompt = list(range(20, 60))
    logits = {}
    calls = []
    original = gemlite.forward_functional

    def counting(*args, **kwargs):
        calls.append(args[0].shape[0])
        return original(*args, **kwargs)

    for backend in ("gemlite", "dequant"):
        loaded = load_model(folder, device="cpu", dtype="float32", max_context=256, int4_backend=backend, compile="off")
        backends = {m.backend for m in loaded.model.modules() if hasattr(m, "gemlite_max_rows")}
        with mock.patch.object(gemlite, "forward_functional", counting), torch.inference_mode():
            steps = [loaded.model.forward(prompt, 0, all_logits=True)]
            for position, token in enumerate((5, 9, 17), start=len(prompt)):
                steps.append(loaded.model.forward([token], position, all_logits=True))
        logits[backend] = torch.cat([step.reshape(-1, step.shape[-1]) for step in steps])
        if backend == "gemlite":
            gemlite_backends, gemlite_calls = sorted(backends), list(calls)
    ref, got = logits["dequant"], logits["gemlite"]
    return {
        "backends": gemlite_backends,
        "kernel_rows": sorted(set(gemlite_calls)),
        "kernel_calls": len(gemlite_calls),
        "rel_err": ((got - ref).norm() / ref.norm()).item(),
        "same_argmax": bool(torch.equal(got.argmax(-1), ref.argmax(-1))),
    }


def main() -> None:
    gemlite = import_gemlite()
    from internvl_chat.quant import gemlite_backend

    print(json.dumps({"available": gemlite_backend.gemlite_backend_available("cpu")}), flush=True)
    if sys.argv[1] == "--model":
        print(json.dumps(compare_model(sys.argv[2], gemlite)), flush=True)
        return
    for case in json.loads(sys.argv[1]):
        print(json.dumps(run_case(case, gemlite)), flush=True)


if __name__ == "__main__":
    main()
