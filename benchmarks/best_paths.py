"""Runner's best single-job rates on the two launch-bound steps, for a tree given on the command
line: run on an earlier commit's tree and on this one in one sitting, it shows whether an engine
change lost speed. IWAE k=50 batch 20 (iwae_paper's GPU path: captured, compiled, TF32, 10 steps
per launch) and the char-LSTM 2x128 (captured step). Each rate: the median of the logged training
rates after the first two windows.

Usage: python benchmarks/best_paths.py TREE [--mnist DIR] [--text FILE] [--out FILE]
                                      [--iwae-set KEY=VALUE ...] [--iwae-only]
--iwae-set adds overrides to the IWAE run (e.g. trainer.compile_optimizer=true), to compare
settings on one tree (bash benchmarks/run_gpu.sh modes).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def rate(tree: Path, unit: str, *overrides: str) -> float:
    root = tempfile.mkdtemp(prefix="bench-best-")
    done = subprocess.run([sys.executable, "-m", "runner", *overrides, "trainer.progress=none", f"output_root={root}"],
                          cwd=tree, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    (run,) = (Path(root) / "runs").iterdir()
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    return statistics.median([r[f"{unit}_per_s"] for r in rows if r["split"] == "train"][2:])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("tree")
    parser.add_argument("--mnist", default=str(ROOT / ".gpu_data" / "mnist"))
    parser.add_argument("--text", default=str(ROOT / ".gpu_data" / "tinyshakespeare" / "input.txt"))
    parser.add_argument("--smoke", action="store_true", help="a few CPU steps, to check the script")
    parser.add_argument("--out", default=None)
    parser.add_argument("--iwae-set", nargs="*", default=[], metavar="KEY=VALUE")
    parser.add_argument("--iwae-only", action="store_true")
    args = parser.parse_args()
    tree = Path(args.tree).resolve()
    device, steps = ("device=cpu", 0.01) if args.smoke else ("device=gpu", 1.0)
    iwae = rate(tree, "samples", "experiment=iwae_mnist", f"dataset.root={args.mnist}", "dataset.n_val=0", device,
                "trainer.batch_size=20", "loss.k=50", "loss.eval_k=1", f"trainer.max_steps={int(30000 * steps)}",
                f"trainer.log_every_n_steps={int(3000 * steps)}", *([] if args.smoke else [
                    "trainer.cuda_graph=true", "trainer.data_on_device=true", "trainer.compile=true",
                    "trainer.precision=tf32", "trainer.steps_per_graph=10"]), *args.iwae_set) / 20
    settings = f" [{' '.join(args.iwae_set)}]" if args.iwae_set else ""
    if args.iwae_only:
        print(f"{tree.name or tree}: iwae {iwae:,.0f} steps/s{settings}", flush=True)
        return
    charlm = rate(tree, "tokens", "experiment=char_lstm_shakespeare", f"dataset.path={args.text}", device,
                  f"trainer.max_steps={int(2000 * steps)}", f"trainer.log_every_n_steps={int(250 * steps)}",
                  *([] if args.smoke else ["trainer.cuda_graph=true"]))
    print(f"{tree.name or tree}: iwae {iwae:,.0f} steps/s{settings}, char-LSTM {charlm / 1e6:.3f}M tokens/s", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"tree": str(tree), "iwae_steps_s": iwae, "charlm_tokens_s": charlm}))


if __name__ == "__main__":
    main()
