#!/usr/bin/env bash
# Everything a lent GPU should run, as one command from the repository root (README, "GPU"):
#   1. env.txt    nvidia-smi, torch / CUDA / lightning / polars versions
#   2. tests.txt  the CUDA tests (`-m gpu`: tests/test_devices.py on the device: a step against
#                 the float64 padded model, a bf16-autocast step, a bf16-mixed run through the
#                 configs with the store on the device)
#   3. bench.txt  bench_train on the device in bf16-mixed at GPU batch sizes, then BST with the
#                 length groups off (the padded path: no host sync to plan groups)
#   4. train.txt  the README's GPU command on the default synthetic data, timed
# Each part has its own time limit and writes its file under $OUT (the device tool's folder,
# else ./gpu_out) whatever the others do; the whole stays under ~9 minutes.
# Before the device call, here: `bash benchmarks/gpu_wheels.sh` (the packages its image lacks),
# and carry `.whl`. DEVICE=cpu BATCHES=256 STEPS=2 runs the same plumbing on a CPU.
set -u -o pipefail
OUT=${OUT:-gpu_out}
DEVICE=${DEVICE:-cuda}
BATCHES=${BATCHES:-4096 16384}
STEPS=${STEPS:-10}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/seqrank-site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/seqrank-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD/src:$PYTHONPATH PYTHONUNBUFFERED=1 WANDB_MODE=offline
# the CPU kernels are not what is measured here: skip their ~1 min build (Python kernels instead)
export SEQRANK_FUSED_ATTENTION=0 SEQRANK_FUSED_ADAM=0
trainer=$([ "$DEVICE" = cuda ] && echo gpu || echo cpu)

{
    nvidia-smi || true
    "$PY" -c "import torch, lightning, polars, hydra
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())
print('device', torch.cuda.get_device_name() if torch.cuda.is_available() else 'none')
print('lightning', lightning.__version__, 'polars', polars.__version__, 'hydra', hydra.__version__)"
} >"$OUT/env.txt" 2>&1

timeout 150 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/test_devices.py >"$OUT/tests.txt" 2>&1
echo "exit $?" >>"$OUT/tests.txt"

{
    # shellcheck disable=SC2086
    timeout 240 "$PY" benchmarks/bench_train.py --device "$DEVICE" --precision bf16-mixed \
        --batch $BATCHES --hist 20 50 --models bst atrank --steps "$STEPS" --work-dir "$OUT/bench"
    echo "exit $?"
    # shellcheck disable=SC2086
    timeout 90 "$PY" benchmarks/bench_train.py --device "$DEVICE" --precision bf16-mixed \
        --batch $BATCHES --hist 20 --models bst --steps "$STEPS" --length-groups 0 \
        --work-dir "$OUT/bench"
    echo "exit $?"
} >"$OUT/bench.txt" 2>&1

{
    start=$(date +%s)
    timeout 90 "$PY" train.py "trainer=$trainer" trainer.precision=bf16-mixed \
        data.device_store=true "paths.root_dir=$OUT/train" logger=csv
    echo "exit $? after $(($(date +%s) - start)) s"
} >"$OUT/train.txt" 2>&1
rm -rf "$OUT/bench" "$OUT/train"  # only the four reports come back
tail -n 25 "$OUT"/*.txt
