#!/usr/bin/env bash
# Everything measured on the lent GPU in one call: GPU tests, then the three side-by-side
# benchmarks. Results (JSON) go to $OUT (or ./bench-out); each prints its table last.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench-out}; mkdir -p "$OUT"
export PYTHONPATH="$PWD/.gpu_site:$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python -c "import torch; print('torch', torch.__version__)"
what=${1:-all}
if [[ $what == all || $what == tests ]]; then python -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tail -5; fi
if [[ $what == all || $what == iwae ]]; then python benchmarks/iwae.py --out "$OUT/iwae.json" 2>&1 | tail -12; fi
if [[ $what == all || $what == densenet ]]; then python benchmarks/densenet.py --out "$OUT/densenet.json" 2>&1 | tail -14; fi
if [[ $what == all || $what == charlm ]]; then python benchmarks/char_lstm.py --out "$OUT/char_lstm.json" 2>&1 | tail -6; fi
