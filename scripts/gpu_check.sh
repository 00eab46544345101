#!/usr/bin/env bash
# The one prepared script for the lent GPU machine (see /work/.library/device/README.md); ≤ 6 minutes.
#   1. environment: nvidia-smi, Python / torch / triton versions                → $OUT/env.txt
#   2. the CUDA tests (int4 kernels first; compiled step in CUDA graphs, W4, no host sync, ...) → $OUT/cuda_tests.txt
#   3. the GPU rows: InternVL3-8B/-1B/-2B LLM shapes, random weights (bench.py --sections
#      shapes), per shape W4 tinygemm, W4 triton (where available), bf16, W4 gemlite (where
#      available): decode tok/s eager / CUDA graphs without and with the fused kernels / compiled
#      inside the graphs, share of the copy bandwidth measured in the same call, kernels per layer,
#      decode after 16k tokens (graphs without and with the fused kernels), 13-tile TTFT, follow-up
#      TTFT after 1k/4k tokens of history (eager and from a prefill graph), compile time
#                                                                              → $OUT/bench_cuda.{txt,json}
#      (before the kernel sections: the issue's numbers get the time first)
#   4. with the time left: the int4 linears (bench.py --sections gemv): every int4 backend this build has (tinygemm
#      kernel and dense path, triton, gemlite, ...) and bf16 on each decoder linear of the
#      8B/1B/2B LLMs by rows M = 1…512: µs, GB/s, share of the copy bandwidth, output checked
#      against the dequantized weight, the fastest backend per (shape, M)    → $OUT/bench_gemv_cuda.{txt,json}
#      (a process of its own: a faulty new kernel cannot take the next step's CUDA context down)
#   4b. only with SWEEP=1 (not in the default run): the triton GEMV's launch configurations
#      (bench.py --sections gemv-sweep): the default and ~15 others on the four 8B linears at M = 1,
#      µs, share of the copy bandwidth, output check, the best per shape vs the default and
#      tinygemm                                                                → $OUT/bench_sweep_cuda.{txt,json}
#      (~100 s: its budget SWEEP_BUDGET, 100 s; timeout SWEEP_TIMEOUT, 130 s; SWEEP_ARGS: extra
#      arguments, e.g. '--sweep-rows 1,4' or '--sweep-configs 64:512:4:528,32:256:4:1056'). The sweep
#      alone, as a call of its own (~2 min with the machine's start-up):
#      PYTHONPATH=$PWD python scripts/bench.py --device cuda --sections gemv-sweep --out "$OUT/bench_sweep_cuda.json"
#   4c. only with SWEEP=1, after 4b: the one-pass dequantization's launch configurations (bench.py
#      --sections dequant-sweep): both layouts' kernels (tinygemm, repacked) on the four 8B linears,
#      the default and ~14 others, µs, GB/s, share of the copy bandwidth, each output bit for bit
#      against the default's, the best per shape and over all shapes vs the default
#                                                                              → $OUT/bench_dqsweep_cuda.{txt,json}
#      (~45 s: its budget DQSWEEP_BUDGET, 45 s; timeout DQSWEEP_TIMEOUT, 70 s; DQSWEEP_ARGS, e.g.
#      '--dqsweep-configs 16:32:4,32:32:8'). Alone: ... --sections dequant-sweep --out "$OUT/bench_dqsweep_cuda.json"
# Each step has its own timeout, cut to what is left of TOTAL_LIMIT (6 minutes: the device allows
# 10 a call but 15 a session, so a rerun must fit); the steps before the tests (wheels, environment, the CUDA check) have short fixed ones
# (SETUP_TIMEOUT each), as a wedged driver can hang nvidia-smi or CUDA's start; a failing step does
# not stop the next; the exit status is non-zero if any step failed.
# Rows left when a bench's time budget runs out are reported as skipped; rows are measured
# without the compiled step once less time is left than a compile took.
#
# Measured on an H200 (2026-12-04, benchmarks/RESULTS.md): environment ~10 s; the default tests 87 s
# (each kernel's first call compiles it; the fused kernels' tests came after); gemv ~30 s of first-call compiles, then ~1.5 s a shape for 3
# columns at 3 row counts; shapes 8B W4 61 s (a 33 s cold compile), 8B bf16 33 s, each 1B/2B row
# 23-40 s, a triton row ~100 s (87 s of compile). Every row does not fit one call: the shapes rows
# come W4 and bf16 of every size first, the other int4 kernels last, and a second call can take the
# rows the first did not reach (BENCH_ARGS='--shape-rows ...', a shorter CUDA_TEST_FILES), as that
# run did (then in the old order: gemv before the rows). TOTAL_LIMIT (340 s) caps every step's timeout, so the call ends within 6 minutes
# whatever a step does.
#
# Without a CUDA GPU this is a dry run on the CPU: the same code paths at a tiny shape
# (bench.py --device cpu --quick --sections shapes, compiled step included, then gemv, with SWEEP=1
# gemv-sweep and dequant-sweep; the Triton kernels in Triton's interpreter) and the
# compiled-step tests; it prints "DRY RUN" and no GPU number comes out of it.
#
# Run from the repository root:  OUT=/some/dir bash scripts/gpu_check.sh
# Wheels for packages the machine lacks go in .wheels/ (or .whl/), carried with the tree:
# scripts/gpu_wheels.sh builds them (gemlite);
# BENCH_GIT_COMMIT=<sha> to record the commit when the copied tree has no .git; CUDA_TEST_FILES,
# TEST_TIMEOUT, GEMV_TIMEOUT, GEMV_BUDGET, SWEEP_TIMEOUT, SWEEP_BUDGET, DQSWEEP_TIMEOUT, DQSWEEP_BUDGET,
# BENCH_TIMEOUT, SHAPES_BUDGET, TOTAL_LIMIT, SETUP_TIMEOUT to fit the time left; BENCH_ARGS / GEMV_ARGS /
# SWEEP_ARGS / DQSWEEP_ARGS: extra arguments of the shapes / gemv / gemv-sweep / dequant-sweep step, e.g. a rerun's
# '--shape-rows InternVL3-1B:w4,InternVL3-8B:bf16' / '--gemv-rows 1,16 --gemv-columns tinygemm,triton,bf16'.
set -u

OUT="${OUT:-$PWD/gpu_out}"
PY="${PYTHON:-python3}"
TEST_TIMEOUT="${TEST_TIMEOUT:-}"
GEMV_TIMEOUT="${GEMV_TIMEOUT:-60}"
GEMV_BUDGET="${GEMV_BUDGET:-35}"
BENCH_TIMEOUT="${BENCH_TIMEOUT:-230}"
SHAPES_BUDGET="${SHAPES_BUDGET:-170}"
SETUP_TIMEOUT="${SETUP_TIMEOUT:-45}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export TOKENIZERS_PARALLELISM=false
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# a fresh machine compiles everything once; keep Inductor's cache with the run's other files
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-/tmp/internvl-inductor}"
START=$SECONDS
FAILED=()

step() { echo; echo "=== $* (t=$((SECONDS - START))s)"; }
# a step's timeout: what it asks for, cut to what is left of TOTAL_LIMIT (less 15 s for the kill
# grace and the summary); at least 1
capped() {
    local want=$1 left=$((TOTAL_LIMIT - (SECONDS - START) - 15))
    [ "$left" -lt "$want" ] && want=$left
    [ "$want" -lt 1 ] && want=1
    echo "$want"
}

# a step's command under its timeout, its output shown and kept in `file`; a failure is recorded
# under `name` (with its exit status) and does not stop the next step
logged() {
    local name=$1 timeout=$2 file=$3 rc
    shift 3
    set -o pipefail
    timeout -k 10 "$timeout" "$@" 2>&1 | tee "$file"
    rc=$?
    set +o pipefail
    [ $rc -eq 0 ] || { echo "$name: exit $rc"; FAILED+=("$name($rc)"); }
}

# --- 0. wheels we carry (no network there) ------------------------------------------------
for dir in .wheels .whl; do
    if compgen -G "$dir/*.whl" >/dev/null; then
        step "installing carried wheels from $dir"
        if timeout -k 5 "$SETUP_TIMEOUT" "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
            --upgrade --target /tmp/site "$dir"/*.whl; then
            export PYTHONPATH="$PYTHONPATH:/tmp/site"  # after the repo: never shadow the image's torch
        else
            FAILED+=("wheels")
        fi
    fi
done

# --- 1. environment -------------------------------------------------------------------------
step "environment"
{
    timeout -k 5 20 nvidia-smi || echo "nvidia-smi failed or timed out"
    echo
    timeout -k 5 "$SETUP_TIMEOUT" "$PY" - <<'PYEOF' || echo "the environment report failed or timed out"
import importlib, platform, sys
print("python", platform.python_version(), sys.executable)
for name in ("torch", "triton", "transformers", "tokenizers", "safetensors", "PIL", "rich", "pytest",
             "prompt_toolkit", "decord", "av", "pexpect", "numpy"):
    try:
        mod = importlib.import_module(name)
        print(f"{name:15} {getattr(mod, '__version__', '?')}")
    except Exception as e:
        print(f"{name:15} MISSING ({type(e).__name__})")
import torch
print("cuda available", torch.cuda.is_available(), "| torch cuda", torch.version.cuda)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu", p.name, f"{p.total_memory / 2**30:.1f} GiB", "sm", torch.cuda.get_device_capability(0), p.multi_processor_count, "SMs")
PYEOF
} 2>&1 | tee "$OUT/env.txt"
# 0: a GPU; 3: none; anything else (a torch that fails to import, a hang) is a failed step
timeout -k 5 "$SETUP_TIMEOUT" "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 3)"
rc=$?
if [ $rc -ne 0 ] && [ $rc -ne 3 ]; then  # what follows is a dry run, and the summary says why
    echo "the CUDA check failed or timed out (exit $rc)"
    FAILED+=("cuda-check($rc)")
fi
if [ $rc -eq 0 ]; then
    DEVICE=cuda
    BENCH_PLAN=()
    # the int4 kernels first (quick, and what the int4 numbers rest on), then the sampler's (quick),
    # then the engine's (several cold compiles: the ones a tight timeout may cut), gemlite last: it autotunes
    DEFAULT_TESTS="tests/test_cuda_int4.py tests/test_sampling.py tests/test_cuda.py tests/test_gemlite.py"
    TEST_TIMEOUT="${TEST_TIMEOUT:-150}"  # 87 s on an H200 before the fused kernels' tests (cold Triton compiles)
    GEMV_ENV=()
    TOTAL_LIMIT="${TOTAL_LIMIT:-340}"  # 6 minutes (room for a rerun in a session's 15), less a margin
else
    DEVICE=cpu
    BENCH_PLAN=(--quick --threads 1)
    DEFAULT_TESTS="tests/test_compiled.py tests/test_cuda.py"
    TEST_TIMEOUT="${TEST_TIMEOUT:-900}"  # a 2-core CPU compiles slowly; the time limit is the GPU's
    TOTAL_LIMIT="${TOTAL_LIMIT:-3600}"
    # Triton's interpreter runs a triton backend on CPU tensors: the gemv step tries it at the tiny
    # shape, within its budget (the backend's own availability check has the last word)
    GEMV_ENV=(env "TRITON_INTERPRET=${TRITON_INTERPRET:-1}")
    echo; echo "DRY RUN: no CUDA GPU here; the same code paths run on the CPU at a tiny shape. No GPU numbers."
fi

# --- 2. tests -------------------------------------------------------------------------------
read -r -a TEST_FILES <<<"${CUDA_TEST_FILES:-$DEFAULT_TESTS}"
TEST_TIMEOUT=$(capped "$TEST_TIMEOUT")
step "tests on $DEVICE (${TEST_FILES[*]}, timeout ${TEST_TIMEOUT}s)"
if ! "$PY" -c "import pytest" 2>/dev/null; then
    echo "pytest is not installed and no wheel for it was carried" | tee "$OUT/cuda_tests.txt"
    FAILED+=("tests")
else
    MARK=(-m cuda)
    [ "$DEVICE" = cpu ] && MARK=(-m "not slow")
    logged tests "$TEST_TIMEOUT" "$OUT/cuda_tests.txt" \
        "$PY" -m pytest -v -rfEs --durations=15 -p no:cacheprovider "${MARK[@]}" "${TEST_FILES[@]}"
fi

# the measuring budget of a bench step: its own, or what its timeout leaves after `reserve`
# seconds of start-up and overrun (the row running when the budget ends)
budget() {
    local want=$1 timeout=$2 reserve=$3
    [ $((timeout - reserve)) -lt "$want" ] && want=$((timeout - reserve))
    [ "$want" -lt 1 ] && want=1
    echo "$want"
}

# --- 3. the GPU rows (before the kernel sections: the issue's numbers first) -----------------
BENCH_TIMEOUT=$(capped "$BENCH_TIMEOUT")
SHAPES_BUDGET=$(budget "$SHAPES_BUDGET" "$BENCH_TIMEOUT" 40)
step "decode / TTFT rows on $DEVICE (timeout ${BENCH_TIMEOUT}s, budget ${SHAPES_BUDGET}s)"
logged bench "$BENCH_TIMEOUT" "$OUT/bench_$DEVICE.txt" "$PY" scripts/bench.py --device "$DEVICE" "${BENCH_PLAN[@]}" \
    --sections shapes --time-budget "$SHAPES_BUDGET" --out "$OUT/bench_$DEVICE.json" --work-dir /tmp/internvl-bench ${BENCH_ARGS:-}

# --- 4. the int4 linears (what time is left after the rows) -------------------------------
GEMV_TIMEOUT=$(capped "$GEMV_TIMEOUT")
GEMV_BUDGET=$(budget "$GEMV_BUDGET" "$GEMV_TIMEOUT" 20)
step "int4 linears on $DEVICE (timeout ${GEMV_TIMEOUT}s, budget ${GEMV_BUDGET}s)"
logged gemv "$GEMV_TIMEOUT" "$OUT/bench_gemv_$DEVICE.txt" ${GEMV_ENV[@]+"${GEMV_ENV[@]}"} "$PY" scripts/bench.py \
    --device "$DEVICE" "${BENCH_PLAN[@]}" --sections gemv --time-budget "$GEMV_BUDGET" --gemv-budget "$GEMV_BUDGET" \
    --out "$OUT/bench_gemv_$DEVICE.json" ${GEMV_ARGS:-}

# --- 4b. the triton GEMV's launch configurations (SWEEP=1 only) -----------------------------
if [ "${SWEEP:-0}" = 1 ]; then
    SWEEP_TIMEOUT=$(capped "${SWEEP_TIMEOUT:-130}")
    SWEEP_BUDGET=$(budget "${SWEEP_BUDGET:-100}" "$SWEEP_TIMEOUT" 25)
    step "triton GEMV launch configurations on $DEVICE (timeout ${SWEEP_TIMEOUT}s, budget ${SWEEP_BUDGET}s)"
    logged gemv-sweep "$SWEEP_TIMEOUT" "$OUT/bench_sweep_$DEVICE.txt" ${GEMV_ENV[@]+"${GEMV_ENV[@]}"} "$PY" scripts/bench.py \
        --device "$DEVICE" "${BENCH_PLAN[@]}" --sections gemv-sweep --time-budget "$SWEEP_BUDGET" --sweep-budget "$SWEEP_BUDGET" \
        --out "$OUT/bench_sweep_$DEVICE.json" ${SWEEP_ARGS:-}

    # --- 4c. the one-pass dequantization's launch configurations (SWEEP=1 only) ---------------
    DQSWEEP_TIMEOUT=$(capped "${DQSWEEP_TIMEOUT:-70}")
    DQSWEEP_BUDGET=$(budget "${DQSWEEP_BUDGET:-45}" "$DQSWEEP_TIMEOUT" 20)
    step "dequantization launch configurations on $DEVICE (timeout ${DQSWEEP_TIMEOUT}s, budget ${DQSWEEP_BUDGET}s)"
    logged dequant-sweep "$DQSWEEP_TIMEOUT" "$OUT/bench_dqsweep_$DEVICE.txt" ${GEMV_ENV[@]+"${GEMV_ENV[@]}"} "$PY" scripts/bench.py \
        --device "$DEVICE" "${BENCH_PLAN[@]}" --sections dequant-sweep --time-budget "$DQSWEEP_BUDGET" \
        --dqsweep-budget "$DQSWEEP_BUDGET" --out "$OUT/bench_dqsweep_$DEVICE.json" ${DQSWEEP_ARGS:-}
fi

# --- summary --------------------------------------------------------------------------------
step "done"
[ "$DEVICE" = cpu ] && echo "gpu_check: DRY RUN on the CPU (no CUDA GPU): code paths checked, no GPU numbers"
if [ ${#FAILED[@]} -eq 0 ]; then
    echo "gpu_check: all steps passed in $((SECONDS - START))s"
    exit 0
fi
echo "gpu_check: FAILED steps: ${FAILED[*]} ($((SECONDS - START))s)"
exit 1
