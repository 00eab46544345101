#!/usr/bin/env bash
# Fill .wheels/ with what scripts/gpu_check.sh installs on the lent GPU machine, which has no
# network and lacks these packages (see /work/.library/device/KINDS.md): gemlite (the optional
# int4 backend the gemv and shapes rows measure; PyPI has only its source, so the wheel is built
# here; pure Python). Run here, from the repository root, before the device call, and carry the
# folder: run(carry=[".wheels"], command="OUT=$OUT bash scripts/gpu_check.sh").
set -euo pipefail
PY="${PYTHON:-.venv/bin/python}"
mkdir -p .wheels
"$PY" -m pip wheel -q --no-deps --disable-pip-version-check -w .wheels "gemlite==0.6.0.post2"
ls -l .wheels
