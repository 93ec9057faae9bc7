#!/usr/bin/env bash
# Table 1's one-layer row (experiments/iwae_paper/README.md) as one fused sweep that outlives the
# device tool's 10-minute commands, in chunks across GPU leases:
#   bash benchmarks/table1.sh start    # a fresh sweep, or the one carried in .table1/ (resume=)
#   bash benchmarks/table1.sh status   # the sweep's progress
#   bash benchmarks/table1.sh stop     # SIGTERM (every job checkpoints), then the sweep folder
#                                      # as tar parts of 15 MiB into $OUT, to be kept in .table1/
# The sweep runs from a copy of the tree in /tmp (the tool re-sends the tree with each call) with
# absolute paths, so that resume=, which replays the saved overrides, finds the same ones again.
set -uo pipefail
cd "$(dirname "$0")/.."
SRC=/tmp/t1src SWEEP=/tmp/table1 DATA=/tmp/t1data LOG=/tmp/table1.log
case ${1:-status} in
start)
  rm -rf "$SRC" && mkdir -p "$SRC" "$DATA" && cp -r runner hydra_plugins .gpu_site pyproject.toml "$SRC"/
  [[ -d $DATA/mnist ]] || cp -r .gpu_data/mnist "$DATA"/
  if ls .table1/table1.tar.part* > /dev/null 2>&1; then
    rm -rf "$SWEEP" && cat .table1/table1.tar.part* | tar -x -C /tmp && args=("resume=$SWEEP")
  else
    args=(-m hydra/launcher=fused experiment=iwae_paper "dataset.root=$DATA/mnist" model=vae1
          loss=elbo,iwae loss.k=1,5,50 device=gpu trainer.progress=plain "hydra.sweep.dir=$SWEEP")
  fi
  cd "$SRC" && PYTHONPATH="$SRC/.gpu_site:$SRC" PYTHONUNBUFFERED=1 setsid nohup python -m runner "${args[@]}" \
    >> "$LOG" 2>&1 < /dev/null &
  echo $! > /tmp/table1.pid; sleep 60; tail -5 "$LOG" ;;
status)
  tail -c 1500 "$LOG"; echo; grep -h '"steps"' "$SWEEP"/*/summary.json 2>/dev/null | head ;;
stop)
  pid=$(cat /tmp/table1.pid)  # the session leader: SIGTERM to its group, as timeout and SLURM send it
  kill -TERM -- -"$pid"; for _ in $(seq 180); do kill -0 "$pid" 2> /dev/null || break; sleep 1; done
  tail -c 1500 "$LOG"; echo
  python - <<'EOF'
import json, glob
for f in sorted(glob.glob("/tmp/table1/*/summary.json")):
    s = json.load(open(f)); print(f.split("/")[-2], s.get("status"), s.get("steps"), s.get("epochs"), s.get("title"))
EOF
  mkdir -p "$OUT" && tar -c -C /tmp --exclude='*.prev.pt' table1 | split -b 15M - "$OUT/table1.tar.part"
  cp "$LOG" "$OUT/table1.log"; ls -la "$OUT" ;;
esac
