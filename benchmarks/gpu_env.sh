# Sourced by the GPU scripts: the repository root, $OUT, the carried site packages on the path,
# and the GPU and torch named first in every output.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-bench-out}; mkdir -p "$OUT"
export PYTHONPATH="$PWD/.gpu_site:$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python -c "import torch; print('torch', torch.__version__)"
