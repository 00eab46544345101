"""The compiled CPU decode step with our AVX2 GEMV kernel (engine/cpu_gemv.py) against the same
step with Inductor's own multiply-reduce loops, in one process, rounds interleaved (A B, B A, …)
so that load from other jobs falls on both alike; prints median tokens/s and the median of the
paired ratios. With one thread it times the thread's CPU time (a busy second core then costs
little); with more, wall-clock time.

    .venv/bin/python scripts/bench_gemv_ab.py MODEL_DIR --dtype bfloat16 --threads 1 --steps 16 --rounds 7
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from internvl_chat.engine import compiled, cpu_gemv  # noqa: E402
from internvl_chat.engine.loader import load_model  # noqa: E402

VARIANTS = ("inductor", "avx2")


def build(model_dir: str, dtype: str, variant: str, context: int):
    """A model whose compiled step was traced with (avx2) or without (inductor) the kernel."""
    real_loaded = cpu_gemv.loaded
    if variant == "inductor":
        cpu_gemv.loaded = lambda: False  # traced as where the kernel cannot be built
    try:
        model = load_model(model_dir, device="cpu", dtype=dtype, max_context=context, compile="off").model
        with torch.inference_mode(False):
            if not model.enable_compile(True):
                sys.exit(f"{variant}: the step did not compile ({model.compile_failure})")
    finally:
        cpu_gemv.loaded = real_loaded
    return model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="checkpoint folder")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=16, help="greedy steps per round")
    p.add_argument("--rounds", type=int, default=7)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    failure = cpu_gemv.ensure_loaded(compiled.use_cache_dir())
    if failure:
        sys.exit(f"the kernel is not available here: {failure}")
    clock = time.thread_time if args.threads == 1 else time.perf_counter
    with torch.inference_mode():
        models = {v: build(args.model, args.dtype, v, 2 + args.steps + 64) for v in VARIANTS}
        first = {v: m.forward([5, 6], 0).argmax().view(1) for v, m in models.items()}

        def rate(variant: str) -> tuple[float, list[int]]:
            model, token, tokens = models[variant], first[variant], []
            start = clock()
            for i in range(args.steps):
                token = model.forward(token, 2 + i).argmax().view(1)
                tokens.append(int(token))
            return args.steps / (clock() - start), tokens

        for v in VARIANTS:
            rate(v)  # warm-up
        runs: dict[str, list[float]] = {v: [] for v in VARIANTS}
        tokens = {}
        for r in range(args.rounds):
            for v in VARIANTS if r % 2 == 0 else VARIANTS[::-1]:
                tps, tokens[v] = rate(v)
                runs[v].append(tps)
    paired = [a / b for a, b in zip(runs["avx2"], runs["inductor"])]
    for v in VARIANTS:
        print(f"{v:9s} {args.dtype} {args.threads} thread(s): median {statistics.median(runs[v]):.1f} tok/s  runs {[round(x, 1) for x in runs[v]]}")
    print(f"avx2 / inductor paired: median ×{statistics.median(paired):.2f} (min ×{min(paired):.2f}, max ×{max(paired):.2f}); "
          f"same greedy tokens: {tokens['avx2'] == tokens['inductor']}")  # fmt: skip


if __name__ == "__main__":
    main()
