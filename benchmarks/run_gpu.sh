#!/usr/bin/env bash
# Everything measured on the lent GPU, in parts that each fit one call: GPU tests, the three
# side-by-side benchmarks, the JPEG pipeline, the step profiles and the TF32 accuracy check.
# Results (JSON) go to $OUT (or ./bench-out); each prints its table last.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench-out}; mkdir -p "$OUT"
export PYTHONPATH="$PWD/.gpu_site:$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python -c "import torch; print('torch', torch.__version__)"
what=${1:-all}
if [[ $what == all || $what == tests ]]; then python -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tail -5; fi
if [[ $what == all || $what == iwae ]]; then python benchmarks/iwae.py --out "$OUT/iwae.json" 2>&1 | tail -13; fi
if [[ $what == all || $what == tf32 ]]; then python benchmarks/iwae.py --tf32-check 2 2>&1 | grep "precision=\|nll\|Error"; fi
if [[ $what == all || $what == densenet ]]; then python benchmarks/densenet.py --out "$OUT/densenet.json" 2>&1 | tail -18; fi
if [[ $what == all || $what == jpeg ]]; then python benchmarks/jpeg_decode.py --out "$OUT/jpeg.json" 2>&1 | tail -22; fi
if [[ $what == all || $what == charlm ]]; then python benchmarks/char_lstm.py --out "$OUT/char_lstm.json" 2>&1 | tail -6; fi
if [[ $what == all || $what == profile ]]; then python benchmarks/profile_steps.py --out "$OUT/profile.json" 2>&1 | grep "^IWAE\|^DenseNet"; fi
