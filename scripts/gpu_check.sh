#!/usr/bin/env bash
# The one prepared script for the lent GPU machine (see /work/.library/device/README.md); ≤ 6 minutes.
#   1. environment: nvidia-smi, Python / torch / triton versions                → $OUT/env.txt
#   2. the CUDA tests (compiled step in CUDA graphs, W4, no host sync, ...)      → $OUT/cuda_tests.txt
#   3. the GPU rows: InternVL3-8B/-1B/-2B LLM shapes, W4 then bf16, random weights (bench.py
#      --sections shapes): decode tok/s eager / CUDA graphs / compiled inside the graphs, share of
#      the copy bandwidth measured in the same call, kernels per layer, 13-tile TTFT, follow-up
#      TTFT after 1k/4k tokens of history, compile time                          → $OUT/bench_cuda.{txt,json}
# Each step has its own timeout; a failing step does not stop the next; the exit status is
# non-zero if any step failed. Rows left when the bench's time budget runs out are reported as
# skipped; once less than a minute is left, rows are measured without the compiled step.
#
# Without a CUDA GPU this is a dry run on the CPU: the same code paths at a tiny shape
# (bench.py --device cpu --quick --sections shapes, compiled step included) and the compiled-step
# tests; it prints "DRY RUN" and no GPU number comes out of it.
#
# Run from the repository root:  OUT=/some/dir bash scripts/gpu_check.sh
# Optional: wheels for packages the machine lacks in .wheels/ (or .whl/), carried with the tree;
# BENCH_GIT_COMMIT=<sha> to record the commit when the copied tree has no .git; CUDA_TEST_FILES,
# TEST_TIMEOUT, BENCH_TIMEOUT, BENCH_ARGS (e.g. '--time-budget 100') to fit the time left.
set -u

OUT="${OUT:-$PWD/gpu_out}"
PY="${PYTHON:-python3}"
TEST_TIMEOUT="${TEST_TIMEOUT:-}"
BENCH_TIMEOUT="${BENCH_TIMEOUT:-200}"
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

# --- 0. wheels we carry (no network there) ------------------------------------------------
for dir in .wheels .whl; do
    if compgen -G "$dir/*.whl" >/dev/null; then
        step "installing carried wheels from $dir"
        if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site "$dir"/*.whl; then
            export PYTHONPATH="$PYTHONPATH:/tmp/site"  # after the repo: never shadow the image's torch
        else
            FAILED+=("wheels")
        fi
    fi
done

# --- 1. environment -------------------------------------------------------------------------
step "environment"
{
    nvidia-smi || echo "nvidia-smi failed"
    echo
    "$PY" - <<'PYEOF'
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
if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    DEVICE=cuda
    BENCH_PLAN=()
    DEFAULT_TESTS="tests/test_cuda.py tests/test_sampling.py"
    TEST_TIMEOUT="${TEST_TIMEOUT:-130}"
else
    DEVICE=cpu
    BENCH_PLAN=(--quick --threads 1)
    DEFAULT_TESTS="tests/test_compiled.py tests/test_cuda.py"
    TEST_TIMEOUT="${TEST_TIMEOUT:-900}"  # a 2-core CPU compiles slowly; the time limit is the GPU's
    echo; echo "DRY RUN: no CUDA GPU here; the same code paths run on the CPU at a tiny shape. No GPU numbers."
fi

# --- 2. tests -------------------------------------------------------------------------------
read -r -a TEST_FILES <<<"${CUDA_TEST_FILES:-$DEFAULT_TESTS}"
step "tests on $DEVICE (${TEST_FILES[*]}, timeout ${TEST_TIMEOUT}s)"
if ! "$PY" -c "import pytest" 2>/dev/null; then
    echo "pytest is not installed and no wheel for it was carried" | tee "$OUT/cuda_tests.txt"
    FAILED+=("tests")
else
    MARK=(-m cuda)
    [ "$DEVICE" = cpu ] && MARK=(-m "not slow")
    set -o pipefail
    timeout -k 10 "$TEST_TIMEOUT" "$PY" -m pytest -q -rfEs -p no:cacheprovider "${MARK[@]}" "${TEST_FILES[@]}" 2>&1 \
        | tee "$OUT/cuda_tests.txt"
    rc=$?
    set +o pipefail
    [ $rc -eq 0 ] || { echo "tests: exit $rc"; FAILED+=("tests($rc)"); }
fi

# --- 3. the GPU rows ------------------------------------------------------------------------
step "decode / TTFT rows on $DEVICE (timeout ${BENCH_TIMEOUT}s)"
set -o pipefail
timeout -k 10 "$BENCH_TIMEOUT" "$PY" scripts/bench.py --device "$DEVICE" "${BENCH_PLAN[@]}" --sections shapes \
    --time-budget 130 --out "$OUT/bench_$DEVICE.json" --work-dir /tmp/internvl-bench ${BENCH_ARGS:-} 2>&1 \
    | tee "$OUT/bench_$DEVICE.txt"
rc=$?
set +o pipefail
[ $rc -eq 0 ] || { echo "benchmark: exit $rc"; FAILED+=("bench($rc)"); }

# --- summary --------------------------------------------------------------------------------
step "done"
[ "$DEVICE" = cpu ] && echo "gpu_check: DRY RUN on the CPU (no CUDA GPU): code paths checked, no GPU numbers"
if [ ${#FAILED[@]} -eq 0 ]; then
    echo "gpu_check: all steps passed in $((SECONDS - START))s"
    exit 0
fi
echo "gpu_check: FAILED steps: ${FAILED[*]} ($((SECONDS - START))s)"
exit 1
