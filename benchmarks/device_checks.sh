#!/usr/bin/env bash
# The GPU checks, as one script for a lent device machine (results under $OUT). Not part of CI.
#   .whl/ may hold wheels to install first (e.g. transformers 5.24.0 where the machine has an older one).
set -uo pipefail
OUT=${OUT:-runs/device}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,memory.total --format=csv
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
} 2>&1 | tee "$OUT/gpu.txt"
run() { local name=$1 limit=$2; shift 2; echo "== $name: $*"; timeout "$limit" python3 "$@" 2>&1 | tee "$OUT/$name.txt" | tail -12; }
run teacher_memory 120 benchmarks/teacher_memory.py --device cuda
run teacher_memory_b16 120 benchmarks/teacher_memory.py --device cuda --batch 16 --tokens 64
run infer_7b_1tok 180 benchmarks/infer_overhead.py --device cuda --hidden 4096 --heads 32 --layers 32 --new-tokens 1 --repeats 5
run infer_7b_16tok 120 benchmarks/infer_overhead.py --device cuda --hidden 4096 --heads 32 --layers 32 --new-tokens 16 --repeats 5
run scale_gpu 300 benchmarks/scale_gpu.py --device cuda
