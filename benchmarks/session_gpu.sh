#!/usr/bin/env bash
# One device call's worth of issue 28/29 work (run from the repository root on the GPU machine):
#   stress N   tests/test_gpu.py's random-moment SIGTERM test with N signals (issue 29 item 14)
#   profile    benchmarks/profile_fused.py at 1 and 6 jobs, compiled optimizer, with chrome traces
#   compare    the same profile for the tree in .baseline/ (a copy of runner/ from an earlier commit),
#              then for this one, side by side on the same GPU
#   tests      the GPU tests of the captured, compiled and fused steps
# Results go under $OUT; the last lines printed are the tables.
source "$(dirname "$0")/gpu_env.sh"
while [[ $# -gt 0 ]]; do
  case $1 in
  stress) RUNNER_STRESS_SIGNALS=$2 timeout 420 python -m pytest -q -o addopts="" -p no:cacheprovider -s --tb=short \
            tests/test_gpu.py -k group_signals > "$OUT/stress.log" 2>&1
          grep -E "^\(|passed|failed|^E " "$OUT/stress.log" | tail -25; shift 2 ;;
  profile) python benchmarks/profile_fused.py --jobs 1,6 --compile-optimizer --trace "$OUT" --out "$OUT/profile.json" \
            > "$OUT/profile.log" 2>&1; tail -4 "$OUT/profile.log"; shift ;;
  compare) for tree in .baseline .; do
            PYTHONPATH="$PWD/$tree:$PYTHONPATH" python benchmarks/profile_fused.py --jobs 1,6 --compile-optimizer \
              --out "$OUT/profile_${tree#.}.json" > "$OUT/profile_${tree#.}.log" 2>&1
            echo "tree $tree"; tail -3 "$OUT/profile_${tree#.}.log"; done; shift ;;
  tests) timeout 500 python -m pytest -q -o addopts="" -p no:cacheprovider --tb=short tests/test_gpu.py -k \
           "cuda_graph_step or several_steps or any_optimizer or one_cycle or fused_captured or compiled_optimizer \
            or (compiled_captured and default) or fused_group_with or non_finite or iwae_paper_defaults" \
           > "$OUT/tests.log" 2>&1; grep -E "passed|failed|Error|^E " "$OUT/tests.log" | head -30; shift ;;
  *) echo "unknown part $1"; exit 2 ;;
  esac
done
