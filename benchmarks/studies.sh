#!/usr/bin/env bash
# The experiments/ studies, run on the lent GPU. Each prints its table last; the sweep and run
# folders' summaries are copied to $OUT. Usage: bash benchmarks/studies.sh charlm|iwae|imbalance
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-study-out}; mkdir -p "$OUT"; export OUT
export PYTHONPATH="$PWD/.gpu_site:$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
R="python -m runner trainer.progress=plain device=gpu"
case "$1" in
charlm)  # char-rnn's defaults (50 epochs), then 3 x 512 with dropout 0.5
  T=.gpu_data/tinyshakespeare/input.txt
  /usr/bin/time -f "wall %e s" $R experiment=char_lstm_shakespeare dataset.path=$T trainer.cuda_graph=true \
    output_root=$OUT/charlm 2>&1 | tail -3
  /usr/bin/time -f "wall %e s" $R experiment=char_lstm_shakespeare dataset.path=$T trainer.cuda_graph=true \
    model.hidden_size=512 model.num_layers=3 model.dropout=0.5 trainer.max_epochs=30 \
    output_root=$OUT/charlm512 2>&1 | tail -3
  python - <<'PY'
import json, glob, os
for f in sorted(glob.glob(os.environ["OUT"] + "/charlm*/runs/*/summary.json")):
    s = json.load(open(f)); m = s["metrics"]
    print(f, f"val/bpc {m.get('val/bpc'):.4f} test/bpc {m.get('test/bpc'):.4f} epochs {s['epochs']} "
          f"train {s['samples_seen']/s['throughput']:.0f}s wall {s['wall_time_s']:.0f}s")
PY
  ;;
iwae)  # the paper's schedule cut at stage $2 (default 4: 121 passes), one layer, k=50
  STAGE=${2:-4}
  for LOSS in elbo iwae; do
    /usr/bin/time -f "wall %e s" $R experiment=iwae_paper dataset.root=.gpu_data/mnist loss=$LOSS loss.k=50 \
      schedule.last_stage=$STAGE trainer.cuda_graph=true trainer.data_on_device=true trainer.compile=true \
      trainer.log_every_n_steps=30000 output_root=$OUT/iwae_$LOSS 2>&1 | tail -2
  done
  python - <<'PY'
import json, glob, os
for f in sorted(glob.glob(os.environ["OUT"] + "/iwae_*/runs/*/summary.json")):
    s = json.load(open(f)); m = s["metrics"]
    print(f, {k: round(v, 3) for k, v in m.items() if "test" in k or "active" in k}, "epochs", s["epochs"],
          "steps", s["steps"], f"train {s['samples_seen']/s['throughput']:.0f}s wall {s['wall_time_s']:.0f}s")
PY
  ;;
imbalance)  # 4 losses x 2 samplers x 3 seeds on fashion_mosaic, 4 jobs at a time on the one GPU
  python -m runner -m device=gpu hydra/launcher=parallel hydra.launcher.n_jobs=4 experiment=focal_densenet dataset=fashion_mosaic \
    dataset.root=.gpu_data/fashion-mnist loss=bce,bce_pos_weight,focal,asl dataset.sampler=none,balanced \
    trainer.seed=0,1,2 trainer.max_epochs=${2:-5} trainer.precision=bf16 trainer.channels_last=true \
    dataset.n_train=${3:-20000} dataset.n_val=${4:-4000} dataset.n_test=${4:-4000} \
    trainer.progress=none output_root=$OUT/imbalance 2>&1 | grep -E "error|Error" | head
  SWEEP=$(ls -d $OUT/imbalance/multirun/*)
  python -m runner.report $SWEEP --metric test/mAP --metric test/macro_f1 --metric test/macro_f1_tuned | tail -15
  tar czf $OUT/imbalance_sweep.tgz --exclude='*.pt' $SWEEP
  ;;
esac
