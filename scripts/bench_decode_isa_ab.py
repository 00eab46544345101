"""The C++ decode step with the AVX2 and with the AVX-512 GEMV kernels (the same model, the kernels
switched by cpu_gemv.select), the eager step, and llama-bench (one run of -n 32 per round, a
subprocess), rounds interleaved in one process (A B C, C B A, ...): medians of tokens/s by the
thread's CPU time (and wall clock; llama-bench reports wall clock only) and the paired AVX-512/AVX2
ratios. benchmarks/RESULTS.md, Update 12.

    python scripts/bench_decode_isa_ab.py DTYPE THREADS ROUNDS [VARIANTS]   # env: see below
    MODEL=… GGUF_F32=… GGUF_BF16=… LLAMA_BENCH=… python scripts/bench_decode_isa_ab.py float32 1 5 avx2,avx512,eager,llama
"""
import json, os, statistics, subprocess, sys, time
from pathlib import Path
import torch
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from internvl_chat.engine import compiled, cpu_gemv
from internvl_chat.engine.loader import load_model
MODEL = os.environ.get("MODEL", ".cache/bench-decode/qwen0.5b")
LB = os.environ.get("LLAMA_BENCH", "llama-bench")
dtype, threads, rounds, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), 32
gguf = {"float32": os.environ.get("GGUF_F32", ".cache/bench-decode/gguf-qwen0.5b-f32/model.gguf"),
        "bfloat16": os.environ.get("GGUF_BF16", ".cache/bench-decode/gguf-qwen0.5b-bf16/model.gguf")}[dtype]
torch.set_num_threads(threads)
assert cpu_gemv.ensure_loaded(compiled.use_cache_dir()) is None
variants = sys.argv[4].split(",") if len(sys.argv) > 4 else ["avx2", "avx512", "llama"]
models = {}
with torch.inference_mode():
    for v in variants:
        if v == "llama" or (v == "avx512" and "avx2" in models): continue
        m = load_model(MODEL, device="cpu", dtype=dtype, max_context=256, compile="off").model
        if v in ("native", "avx2"):
            with torch.inference_mode(False):
                assert m.enable_compile(True), m.compile_failure
            assert m.compiled_step.native is not None
        models[v] = m
    prompt = [5 + i for i in range(8)]
    cpu_gemv.select("avx2")
    first = {v: m.forward(prompt, 0).argmax().view(1) for v, m in models.items()}
    def rate(v):
        if v == "llama":
            out = subprocess.run([LB, "-m", gguf, "-t", str(threads), "-p", "0", "-n", str(steps), "-r", "1", "-o", "json"], capture_output=True, text=True, check=True).stdout
            return json.loads(out)[0]["avg_ts"], None
        if v in ("avx2", "avx512"): assert cpu_gemv.select(v) == v
        m, tok = models["avx2" if v == "avx512" else v], first["avx2" if v == "avx512" else v]
        c0, w0 = time.thread_time(), time.perf_counter()
        for i in range(steps):
            tok = m.forward(tok, 8 + i).argmax().view(1)
        return steps / (time.thread_time() - c0), steps / (time.perf_counter() - w0)
    for v in variants: rate(v)
    runs = {v: [] for v in variants}
    for r in range(rounds):
        for v in (variants if r % 2 == 0 else variants[::-1]):
            runs[v].append(rate(v))
print(f"{dtype} {threads}t:")
for v, rs in runs.items():
    cpu = [a for a, _ in rs]; wall = [b for _, b in rs if b]
    print(f"  {v:7s} cpu-time median {statistics.median(cpu):.2f} tok/s {[round(a,2) for a in cpu]}" + (f"  wall median {statistics.median(wall):.2f}" if wall else " (llama-bench: wall)"))
if "avx2" in runs and "avx512" in runs:
    for i, name in ((0, "cpu-time"), (1, "wall")):
        paired = sorted(b[i] / a[i] for a, b in zip(runs["avx2"], runs["avx512"]))
        print(f"  avx512/avx2 paired {name}: median x{statistics.median(paired):.3f} min x{paired[0]:.3f} max x{paired[-1]:.3f}")
