#!/usr/bin/env bash
# Everything measured on the lent GPU, in parts that each fit one call: GPU tests, the three
# side-by-side benchmarks, the JPEG pipeline (and with augmentation, jpeg_aug), fashion_resnet and
# the classification evaluation (classify_eval), the step profiles and the TF32 accuracy check.
# Each part's full output goes to $OUT/<part>.log as it runs (kept if the call is cut short);
# its result lines and table are printed. profile_fused: where a fused group's step time goes;
# modes: the single IWAE path with the compiled optimizer and with compile_mode (issue 18 item 4).
# profile_six: every kernel of IWAE's captured step, one job and six fused (issue 28), with traces;
# step_tests: the GPU tests of the captured, compiled and fused steps; stress: the random-moment
# SIGTERM test (issue 29 item 14), RUNNER_STRESS_SIGNALS signals (20 by default; ~25 s each).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench-out}; mkdir -p "$OUT"
export PYTHONPATH="$PWD/.gpu_site:$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python -c "import torch; print('torch', torch.__version__)"
show() { grep -v "^[│┃┡└┏]\|run folder\|final metrics\|Warning\|warn(" "$1" | tail -"$2"; }
part() { [[ $what == all || $what == "$1" ]]; }
what=${1:-all}
if part tests; then python -m pytest -q -p no:cacheprovider --tb=short tests/test_gpu.py > "$OUT/tests.log" 2>&1
  grep -E "passed|failed|Error|Mismatch|Greatest|^E " "$OUT/tests.log" | head -40; fi
if part iwae; then python benchmarks/iwae.py --out "$OUT/iwae.json" > "$OUT/iwae.log" 2>&1; show "$OUT/iwae.log" 10; fi
if part tf32; then python benchmarks/iwae.py --tf32-check 2 > "$OUT/tf32.log" 2>&1; grep "precision=\|Error" "$OUT/tf32.log"; fi
if part densenet; then python benchmarks/densenet.py --out "$OUT/densenet.json" > "$OUT/densenet.log" 2>&1; show "$OUT/densenet.log" 18; fi
if part eval; then python benchmarks/densenet.py --eval-only --out "$OUT/eval.json" > "$OUT/eval.log" 2>&1; show "$OUT/eval.log" 8; fi
if part jpeg; then python benchmarks/jpeg_decode.py --out "$OUT/jpeg.json" > "$OUT/jpeg.log" 2>&1; show "$OUT/jpeg.log" 22; fi
if part jpeg_aug; then python benchmarks/jpeg_decode.py --augmentation --out "$OUT/jpeg_aug.json" > "$OUT/jpeg_aug.log" 2>&1; show "$OUT/jpeg_aug.log" 9; fi
if part fashion_resnet; then python -m runner experiment=fashion_resnet dataset.root=.gpu_data/fashion-mnist device=gpu trainer.progress=none output_root="$OUT/fashion_resnet" > "$OUT/fashion_resnet.log" 2>&1
  python -c "import json, glob; s = json.load(open(glob.glob('$OUT/fashion_resnet/runs/*/summary.json')[0])); print('fashion_resnet', s['status'], 'test/accuracy', s['metrics'].get('test/accuracy'), 'wall_time_s', s['wall_time_s'], s['device'])"; fi
if part classify_eval; then python benchmarks/classification_eval.py --fashion .gpu_data/fashion-mnist --out "$OUT/classify_eval.json" > "$OUT/classify_eval.log" 2>&1; show "$OUT/classify_eval.log" 5; fi
if part charlm; then python benchmarks/char_lstm.py --out "$OUT/char_lstm.json" > "$OUT/char_lstm.log" 2>&1; show "$OUT/char_lstm.log" 6; fi
if part profile; then python benchmarks/profile_steps.py --out "$OUT/profile.json" > "$OUT/profile.log" 2>&1; grep "^IWAE\|^DenseNet" "$OUT/profile.log"; fi
if part fused; then python benchmarks/fused.py --steps 10000 --jobs 8 --rows a,c,d,e,f --out "$OUT/fused.json" > "$OUT/fused.log" 2>&1; show "$OUT/fused.log" 16; fi
if part profile_fused; then for opt in "" --compile-optimizer; do
    python benchmarks/profile_fused.py --jobs 1,8 $opt --out "$OUT/profile_fused$opt.json" > "$OUT/profile_fused$opt.log" 2>&1
    grep -A4 "^jobs" "$OUT/profile_fused$opt.log"; done; fi
if part profile_six; then python benchmarks/profile_fused.py --jobs 1,6 --compile-optimizer --trace "$OUT" \
    --out "$OUT/profile_six.json" > "$OUT/profile_six.log" 2>&1; tail -3 "$OUT/profile_six.log"; fi
if part step_tests; then python -m pytest -q -o addopts="" -p no:cacheprovider --tb=short tests/test_gpu.py -k \
    "cuda_graph_step or several_steps or any_optimizer or one_cycle or fused_captured or compiled_optimizer \
     or (compiled_captured and default) or fused_group_with or non_finite or iwae_paper_defaults" \
    > "$OUT/step_tests.log" 2>&1; grep -E "passed|failed|Error|^E " "$OUT/step_tests.log" | head -30; fi
if part stress; then python -m pytest -q -o addopts="" -p no:cacheprovider -s --tb=short tests/test_gpu.py \
    -k group_signals > "$OUT/stress.log" 2>&1; grep -E "^\(|passed|failed|^E " "$OUT/stress.log" | tail -25; fi
if part fused_charlm; then python benchmarks/fused.py --family charlm --steps 4000 --out "$OUT/fused_charlm.json" \
    > "$OUT/fused_charlm.log" 2>&1; show "$OUT/fused_charlm.log" 10; fi
# Issue 28 item 1: model.fused_output (the decoder's output layer and Bernoulli log-likelihood as one
# Triton op) on the GPU. kernels_tests: its tests (tests/vae_kernels_cases.py on CUDA tensors, the GPU ones);
# kernels: the op alone, the single iwae_paper path and six fused jobs, flag off and on;
# kernels_tune: the op alone over other tile choices.
if part kernels_tests; then python -m pytest -q -p no:cacheprovider --tb=short -m "slow or not slow" \
    -k "vae_kernels or fused_output" tests/vae_kernels_cases.py tests/test_gpu.py > "$OUT/kernels_tests.log" 2>&1
  grep -E "passed|failed|Error|Mismatch|Greatest|^E " "$OUT/kernels_tests.log" | head -20; fi
if part kernels; then python benchmarks/iwae_kernels.py --out "$OUT/kernels.json" > "$OUT/kernels.log" 2>&1
  show "$OUT/kernels.log" 13; fi
if part kernels_tune; then python benchmarks/iwae_kernels.py --parts op --tune > "$OUT/kernels_tune.log" 2>&1
  show "$OUT/kernels_tune.log" 30; fi
# The last GPU-measured tree (.baseline/, git archive <commit> --prefix=.baseline/) against this one.
if part best; then for tree in .baseline .; do python benchmarks/best_paths.py "$tree" >> "$OUT/best.log" 2>&1; done
  grep "steps/s\|Error" "$OUT/best.log"; fi
# The fused x8 row (f: the compiled optimizer, as iwae_paper's GPU default) on the last GPU-measured
# tree (.baseline/) and on this one, one after the other: with `best`, an engine change's speed check.
# (fused.py runs runner in its own process: PYTHONPATH names the tree whose runner it imports.)
if part fused_both; then root=$PWD; for tree in .baseline .; do (cd "$tree" && echo "tree $tree" && \
    PYTHONPATH="$root/.gpu_site:$PWD" python benchmarks/fused.py --steps 10000 --jobs 8 --rows f \
    --mnist "$root/.gpu_data/mnist") >> "$OUT/fused_both.log" 2>&1; done
  grep -i "^tree\|fused\|single\|Error" "$OUT/fused_both.log" | tail -14; fi
# Issue 18 item 4: the single IWAE path under the settings that may reach 5,500 steps/s, one call.
if part modes; then for set in "" "trainer.compile_optimizer=true" \
    "trainer.compile_optimizer=true trainer.compile_mode=max-autotune-no-cudagraphs"; do
    python benchmarks/best_paths.py . --iwae-only --iwae-set $set >> "$OUT/modes.log" 2>&1; done
  grep "steps/s\|Error" "$OUT/modes.log"; fi
# experiments/iwae_paper/README.md: VAE and IWAE (k=50) on Caltech 101 Silhouettes, 3 seeds, fused,
# the practitioners' schedule (2^i passes at 1e-4 x 10^(-i/7), 255 passes), test NLL with k=5000.
if part caltech; then python -m runner -m hydra/launcher=fused experiment=iwae_paper dataset=caltech_silhouettes \
    dataset.root=.gpu_data/caltech101_silhouettes loss=elbo,iwae trainer.seed=0,1,2 schedule.base=2 optim.lr=1e-4 \
    trainer.compile=false trainer.val_every_n_steps=100000000 trainer.save_top_k=0 trainer.progress=plain \
    output_root="$OUT/caltech" > "$OUT/caltech.log" 2>&1
  python -m runner.report "$OUT"/caltech/multirun/* --metric test/nll_k5000 --metric active_units 2>&1 | tail -8
  grep "wall_time_s\|Error" "$OUT"/caltech/multirun/*/0/summary.json | head -3; fi
