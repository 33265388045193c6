#!/usr/bin/env bash
# Every GPU check and figure in one call, for a short-lived GPU machine:
# the GPU tests, then the train / export / stream benchmarks with their CUDA sections.
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
timeout 150 python3 -m pytest -q -p no:cacheprovider -m gpu tests 2>&1 | tee "$OUT/gpu_tests.log"
for section in train export stream; do
    echo "== bench $section"
    timeout 150 python3 scripts/bench.py "$section" --gpu --out "$OUT/$section.json" 2>&1 | tail -n 20
done
