#!/usr/bin/env bash
# Downloads into .whl/ (git-ignored) the wheels that a lent GPU machine's image lacks, for its
# Python 3.12 on x86-64, at the versions of this checkout's .venv: polars (and its runtime),
# hydra-core, omegaconf, and antlr4 (sdist only on PyPI, so built here into a pure wheel). The
# image has torch, lightning, torchmetrics, numpy, pyarrow, rich, filelock, matplotlib, ninja,
# pytest. About 55 MB: it fits the device tool's 64 MiB working tree. Then, on the device:
# `bash benchmarks/gpu_check.sh` with `.whl` carried (README, "GPU").
set -euo pipefail
cd "$(dirname "$0")/.."
VENV_PY=${VENV_PY:-.venv/bin/python}
version() { "$VENV_PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"; }
pins=()
for pkg in polars polars-runtime-32 hydra-core omegaconf; do
    if v=$(version "$pkg" 2>/dev/null); then pins+=("$pkg==$v"); fi
done
rm -rf .whl && mkdir .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl "${pins[@]}"
python3 -m pip wheel -q --no-deps -w .whl "antlr4-python3-runtime==$(version antlr4-python3-runtime)"
ls -l .whl
du -sh .whl
