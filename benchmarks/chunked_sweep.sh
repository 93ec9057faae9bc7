#!/usr/bin/env bash
# A sweep longer than one device call, in chunks: each call trains for at most SECONDS, then
# SIGTERM makes runner checkpoint every job and stop; the next call resumes the sweep folder
# (resume=<sweep folder>; fused jobs fuse again). The sweep folder travels as a tar file cut in
# 15 MiB parts ($OUT/NAME.tar.partNN: a file back from the machine may have 16 MiB); copy them to
# .gpu_runs/ here (git-ignored, replacing the old parts) and carry .gpu_runs on the next call.
# .gpu_runs/ lasts as long as this working checkout: a session that starts on a new checkout
# has lost it (Table 1's row was lost so at 69.3%, experiments/iwae_paper/README.md).
# Table 1's one-layer row, for example (one chunk a call):
#   bash benchmarks/chunked_sweep.sh table1 540 hydra/launcher=fused experiment=iwae_paper \
#       dataset.root=.gpu_data/mnist model=vae1 loss=elbo,iwae loss.k=1,5,50 trainer.save_top_k=0
# Later chunks: bash benchmarks/chunked_sweep.sh table1 575 trainer.ckpt_every_n_epochs=100 (overrides
# after the seconds go to the resumed sweep, which takes those that may change mid-run).
# Prints each job's step and status; exit 0 while the sweep goes on or when it is done.
set -uo pipefail
cd "$(dirname "$0")/.."
name=$1 seconds=$2; shift 2
OUT=${OUT:-bench-out}; mkdir -p "$OUT"
work=$(mktemp -d)/"$name"
# runner for at most $seconds, then SIGTERM to runner's own process (not, as `timeout` does, to its
# whole process group with torch.compile's worker processes: on an H200 that way runner died
# without its interrupted checkpoint), SIGKILL a minute later if it has not stopped.
run_for() {
  python -m runner "$@" & local pid=$!
  ( sleep "$seconds"; kill -TERM "$pid" 2>/dev/null; sleep 60; kill -KILL "$pid" 2>/dev/null ) & local watch=$!
  wait "$pid"; local code=$?
  pkill -P "$watch" 2>/dev/null; kill "$watch" 2>/dev/null
  return "$code"
}
if compgen -G ".gpu_runs/$name.tar.part*" > /dev/null; then
  mkdir -p "$work" && cat ".gpu_runs/$name.tar.part"* | tar -xf - -C "$work"
  sweep=$(ls -d "$work"/multirun/*/ | head -1)
  echo "resuming $sweep"
  run_for "resume=${sweep%/}" trainer.progress=plain "$@"  # on a resume: overrides that may change mid-run
else
  run_for -m "$@" trainer.progress=plain "output_root=$work"
fi
echo "runner exit code $?"
tar -cf - -C "$work" multirun | split -b 15M -d - "$OUT/$name.tar.part"
python - "$work" <<'EOF'
import json, sys
from pathlib import Path
for summary in sorted(Path(sys.argv[1]).glob("multirun/*/*/summary.json")):
    s = json.loads(summary.read_text())
    print(summary.parent.name, s.get("status"), "step", s.get("steps"), {k: v for k, v in s.get("metrics", {}).items()
                                                                         if "nll" in k or k == "active_units"})
EOF
ls -la "$OUT/$name.tar.part"*
