"""W4 (AWQ g128, the `torch` int4 backend) against bf16 on a CPU, side by side in one process: a
Qwen2.5-0.5B-shaped decoder (InternVL3-1B's LLM, random weights) built twice from the same seed,
greedy decode from the same context, eager and then with the fast decode step `model.compile`
picks (bf16: the C++ step where the AVX2 kernels load; W4: Inductor's step around tinygemm's CPU
kernel), rounds interleaved so that load from other jobs falls on both alike. Prints tokens/s and
the bytes each step reads.

    .venv/bin/python scripts/bench_w4_cpu_ab.py --threads 2 --rounds 3
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_lib as bl  # noqa: E402
from script_args import positive_int  # noqa: E402

CONTEXT = 64  # prompt tokens before the timed steps
STEPS = 24  # greedy steps per timed run


def build(w4: bool):
    hidden, layers, heads, kv_heads, ffn = 896, 24, 14, 2, 4864  # SPEC §1, InternVL3-1B's LLM
    cfg = bl.text_shape_config(hidden, layers, heads, kv_heads, ffn, w4, bl.VISION_TINY, bl.VOCAB)
    model = bl.build_random_model(cfg, torch.device("cpu"), torch.bfloat16, CONTEXT + STEPS + 64)
    with torch.inference_mode():
        first = model.forward(torch.arange(10, 10 + CONTEXT), 0).argmax().view(1)
    return model, first


def rate(model, first: torch.Tensor) -> float:
    with torch.inference_mode():
        return bl._steps_rate(model, first, CONTEXT, STEPS)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=positive_int, default=1)
    ap.add_argument("--rounds", type=positive_int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    variants = {"bf16": build(False), "w4": build(True)}
    for name, (model, _) in variants.items():
        gb = bl.decode_bytes_per_token(model, CONTEXT + STEPS // 2)["total"] / 1e9
        print(f"{name}: {gb:.3f} GB read per decode step", flush=True)
    for mode in ("eager", "compiled"):
        if mode == "compiled":
            for name, (model, first) in variants.items():
                t0 = time.perf_counter()
                if not model.enable_compile(True):
                    sys.exit(f"{name}: the decode step did not compile: {model.compile_failure}")
                kind = "C++ step" if model.compiled_step.native is not None else "Inductor"
                rate(model, first)  # first calls after the compile
                print(f"{name}: compiled ({kind}) in {time.perf_counter() - t0:.1f} s", flush=True)
        rates: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(args.rounds):
            for name, (model, first) in variants.items():
                rates[name].append(rate(model, first))
        for name, runs in rates.items():
            shown = ", ".join(f"{r:.1f}" for r in runs)
            print(f"{mode} {name}: median {bl.median(runs):.1f} tok/s ({shown})", flush=True)
        print(f"{mode} w4 ÷ bf16: ×{bl.median(rates['w4']) / bl.median(rates['bf16']):.2f}", flush=True)


if __name__ == "__main__":
    main()
