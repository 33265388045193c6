#!/usr/bin/env bash
# Every GPU check and figure in one call, for a short-lived GPU machine (about 8 minutes):
# - the GPU tests (pytest -m gpu: CUDA energies, pinned host batches, per-model precision);
# - bench train --gpu: grid training at batch 16,384 with trainer=gpu's defaults against the
#   in-memory fp32 loop (targets: ratio >= 0.8, >= 4.5e6 samples/s on an H200), bf16 against
#   fp32 in memory, and the field capsule's rate (fusion 3 x 64 x 64 from the state cache);
# - bench stream: the stream ratios and the state cache's epoch (with LitData beside it when
#   its wheel is carried in .whl/) on the machine's CPUs;
# - bench export --gpu.
# Usage (from the repository root): OUT=results bash scripts/gpu_checks.sh
# Packages the machine lacks can be carried as wheels in .whl/ (installed into /tmp/site).
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-gpu_results}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi -L
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
timeout 120 python3 -m pytest -q -p no:cacheprovider -m gpu tests 2>&1 | tee "$OUT/gpu_tests.log"
run() {  # section, time limit (s), extra flags
    echo "== bench $1"
    timeout "$2" python3 scripts/bench.py "$1" ${3:-} --json --out "$OUT/$1.json" >/dev/null 2>"$OUT/$1.err"
    echo "rc $?"; tail -n 5 "$OUT/$1.err"
}
run train 240 --gpu
run stream 150
run export 60 --gpu
