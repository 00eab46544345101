#!/usr/bin/env bash
# The one prepared script for the lent GPU machine (see /work/.library/device/README.md):
#   1. environment: nvidia-smi, Python / torch / transformers versions  → $OUT/env.txt
#   2. the CUDA tests of the suite (pytest -m cuda)                      → $OUT/cuda_tests.txt
#   3. the CUDA benchmark (scripts/bench.py --device cuda)               → $OUT/bench_cuda.{txt,json}
# Each step has its own timeout (the whole script stays under 8 minutes); a failing step does not
# stop the next; the exit status is non-zero if any step failed.
#
# Run from the repository root:  OUT=/some/dir bash scripts/gpu_check.sh
# Optional: wheels for packages the machine lacks in .wheels/ (or .whl/), carried with the tree;
# BENCH_GIT_COMMIT=<sha> to record the commit when the copied tree has no .git;
# BENCH_ARGS (e.g. '--time-budget 150') are passed to the benchmark.
set -u

OUT="${OUT:-$PWD/gpu_out}"
PY="${PYTHON:-python3}"
TEST_TIMEOUT="${TEST_TIMEOUT:-150}"
BENCH_TIMEOUT="${BENCH_TIMEOUT:-290}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export TOKENIZERS_PARALLELISM=false
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
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
    "$PY" - <<'EOF'
import importlib, platform, sys
print("python", platform.python_version(), sys.executable)
for name in ("torch", "transformers", "tokenizers", "safetensors", "PIL", "rich", "pytest",
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
EOF
} 2>&1 | tee "$OUT/env.txt"
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || FAILED+=("no-cuda")

# --- 2. CUDA tests --------------------------------------------------------------------------
step "CUDA tests (pytest -m cuda, timeout ${TEST_TIMEOUT}s)"
if [ -n "${CUDA_TEST_FILES:-}" ]; then
    read -r -a CUDA_FILES <<<"$CUDA_TEST_FILES"  # a chosen subset, when device time is short
else
    mapfile -t CUDA_FILES < <(grep -l "mark\.cuda" tests/test_*.py 2>/dev/null)
fi
if ! "$PY" -c "import pytest" 2>/dev/null; then
    echo "pytest is not installed and no wheel for it was carried" | tee "$OUT/cuda_tests.txt"
    FAILED+=("cuda-tests")
elif [ ${#CUDA_FILES[@]} -eq 0 ]; then
    echo "no test file marks tests with pytest.mark.cuda" | tee "$OUT/cuda_tests.txt"
    FAILED+=("cuda-tests")
else
    echo "files: ${CUDA_FILES[*]}"
    set -o pipefail
    timeout -k 10 "$TEST_TIMEOUT" "$PY" -m pytest -q -rfEs -p no:cacheprovider -m cuda "${CUDA_FILES[@]}" 2>&1 \
        | tee "$OUT/cuda_tests.txt"
    rc=$?
    set +o pipefail
    [ $rc -eq 0 ] || { echo "CUDA tests: exit $rc"; FAILED+=("cuda-tests($rc)"); }
fi

# --- 3. CUDA benchmark ----------------------------------------------------------------------
step "CUDA benchmark (timeout ${BENCH_TIMEOUT}s)"
set -o pipefail
timeout -k 10 "$BENCH_TIMEOUT" "$PY" scripts/bench.py --device cuda --out "$OUT/bench_cuda.json" \
    --work-dir /tmp/internvl-bench ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench_cuda.txt"
rc=$?
set +o pipefail
[ $rc -eq 0 ] || { echo "benchmark: exit $rc"; FAILED+=("bench($rc)"); }

# --- summary --------------------------------------------------------------------------------
step "done"
if [ ${#FAILED[@]} -eq 0 ]; then
    echo "gpu_check: all steps passed in $((SECONDS - START))s"
    exit 0
fi
echo "gpu_check: FAILED steps: ${FAILED[*]} ($((SECONDS - START))s)"
exit 1
