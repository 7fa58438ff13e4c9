#!/usr/bin/env bash
# On a lent GPU machine, from the repository root: the packages its image lacks from the wheels
# carried in .whl/ (`make gpu-wheels` on the development machine), then benchmarks/gpu_bench.py
# with the arguments given; results and the log go to $OUT (default benchmarks/results).
#
#   benchmarks/gpu_lease.sh --stages throughput --throughput-micro 14 --deadline-s 560
set -uo pipefail
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 3
  export PYTHONPATH=/tmp/site:$PWD
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
python3 benchmarks/gpu_bench.py --out "$OUT" "$@" 2>&1 | tee -a "$OUT/gpu_bench.log"
