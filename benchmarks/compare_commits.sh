#!/usr/bin/env bash
# One benchmark part (iwae, densenet, charlm: benchmarks/run_gpu.sh) on an earlier commit's tree
# and on this one, one after the other on the same GPU, to show that a change lost no speed.
# The earlier tree lies in .baseline/ (git archive <commit> --prefix=.baseline/ | tar x), carried
# to the GPU machine with .gpu_site and .gpu_data. Logs: $OUT/old/<part>.log, $OUT/new/<part>.log.
set -uo pipefail
cd "$(dirname "$0")/.."
part=${1:?usage: compare_commits.sh PART [more run_gpu.sh parts...]}
OUT=${OUT:-bench-out}
export PYTHONPATH="$PWD/.gpu_site:${PYTHONPATH:-}"
[[ -e .baseline/.gpu_data ]] || ln -s "$PWD/.gpu_data" .baseline/.gpu_data
for p in "$@"; do
  for tree in old new; do
    dir=$([[ $tree == old ]] && echo .baseline || echo .)
    echo "== $p, $tree tree ($(cd "$dir" && git log -1 --format=%h 2>/dev/null || echo "$dir"))"
    mkdir -p "$OUT/$tree"
    OUT="$OUT/$tree" bash "$dir/benchmarks/run_gpu.sh" "$p"
  done
done
