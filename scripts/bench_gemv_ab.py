"""CPU decode steps side by side in one process, rounds interleaved (A B, B A, …) so that load
from other jobs falls on all alike; prints median tokens/s and the median of the paired ratios
against the first variant. Variants: `inductor` (Inductor's compiled step with its own
multiply-reduce loops), `avx2` (the same with our AVX2 GEMV kernel, engine/cpu_gemv.py), `native`
(the whole step in C++, engine/cpu_step.py). With one thread it times the thread's CPU time (a busy
second core then costs little); with more, wall-clock time. `--context N` decodes after N tokens.

    .venv/bin/python scripts/bench_gemv_ab.py MODEL_DIR --dtype bfloat16 --threads 1 --steps 16 --rounds 7
    .venv/bin/python scripts/bench_gemv_ab.py MODEL_DIR --variants avx2,native --context 2000
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
from script_args import one_line_errors, positive_int  # noqa: E402

VARIANTS = ("inductor", "avx2", "native")


def build(model_dir: str, dtype: str, variant: str, context: int):
    """A model with the variant's decode step."""
    real_loaded, real_native = cpu_gemv.loaded, compiled.NATIVE_CPU_STEP
    if variant == "inductor":
        cpu_gemv.loaded = lambda: False  # traced as where the kernel cannot be built
    compiled.NATIVE_CPU_STEP = variant == "native"
    try:
        model = load_model(model_dir, device="cpu", dtype=dtype, max_context=context, compile="off").model
        with torch.inference_mode(False):
            if not model.enable_compile(True):
                sys.exit(f"{variant}: the step did not compile ({model.compile_failure})")
        if (model.compiled_step.native is not None) != (variant == "native"):
            sys.exit(f"{variant}: got the other kind of step")
    finally:
        cpu_gemv.loaded, compiled.NATIVE_CPU_STEP = real_loaded, real_native
    return model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="checkpoint folder")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--threads", type=positive_int, default=1)
    p.add_argument("--steps", type=positive_int, default=16, help="greedy steps per round")
    p.add_argument("--rounds", type=positive_int, default=7)
    p.add_argument("--variants", default="inductor,avx2", help=f"comma-separated, the first is the baseline: {', '.join(VARIANTS)}")
    p.add_argument("--context", type=positive_int, default=2, help="tokens before the timed steps (>= 2)")
    args = p.parse_args()
    variants = tuple(v.strip() for v in args.variants.split(","))
    if len(variants) < 2 or any(v not in VARIANTS for v in variants) or args.context < 2:
        p.error(f"--variants needs two or more of {', '.join(VARIANTS)}; --context at least 2")
    torch.set_num_threads(args.threads)
    failure = cpu_gemv.ensure_loaded(compiled.use_cache_dir())
    if failure:
        sys.exit(f"the kernel is not available here: {failure}")
    clock = time.thread_time if args.threads == 1 else time.perf_counter
    with torch.inference_mode():
        models = {v: build(args.model, args.dtype, v, args.context + args.steps + 64) for v in variants}
        prompt = [5 + i % 200 for i in range(args.context)]
        first = {v: m.forward(prompt, 0).argmax().view(1) for v, m in models.items()}

        def rate(variant: str) -> tuple[float, list[int]]:
            model, token, tokens = models[variant], first[variant], []
            start = clock()
            for i in range(args.steps):
                token = model.forward(token, args.context + i).argmax().view(1)
                tokens.append(int(token))
            return args.steps / (clock() - start), tokens

        for v in variants:
            rate(v)  # warm-up
        runs: dict[str, list[float]] = {v: [] for v in variants}
        tokens = {}
        for r in range(args.rounds):
            for v in variants if r % 2 == 0 else variants[::-1]:
                tps, tokens[v] = rate(v)
                runs[v].append(tps)
    base = variants[0]
    print(f"{args.dtype}, {args.threads} thread(s), after {args.context} tokens:")
    for v in variants:
        print(f"  {v:9s} median {statistics.median(runs[v]):.1f} tok/s  runs {[round(x, 1) for x in runs[v]]}")
    for v in variants[1:]:
        paired = [a / b for a, b in zip(runs[v], runs[base])]
        print(f"  {v} / {base} paired: median ×{statistics.median(paired):.2f} (min ×{min(paired):.2f}, max ×{max(paired):.2f}); "
              f"same greedy tokens: {tokens[v] == tokens[base]}")  # fmt: skip


if __name__ == "__main__":
    sys.exit(one_line_errors(main))
