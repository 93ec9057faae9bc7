"""char-LSTM at char-rnn's defaults (2 x 128, seq 50, batch 50, clip 5) on Tiny Shakespeare.

(a) the hand-written loop: fp32, eager, nn.LSTM with carried state, batches copied from the
    CPU each step, ``loss.item()`` every step;
(c) runner: experiment=char_lstm_shakespeare, fp32 and bf16.
Lightning is left out: it dropped truncated BPTT (``truncated_bptt_steps``) in 2.0, so its
version would be the same hand loop inside a LightningModule.
Usage: python benchmarks/char_lstm.py [--text FILE] [--steps N]
"""
from __future__ import annotations

import argparse
import json

import torch
from torch import nn

from common import ROOT, device_ceilings, rate, run_runner, steady_rate, table

B, L, H, LAYERS = 50, 50, 128, 2


def hand_loop(text: str, device: torch.device, steps: int) -> float:
    vocab = sorted(set(text))
    index = {c: i for i, c in enumerate(vocab)}
    ids = torch.tensor([index[c] for c in text])
    n = (len(ids) - 1) // B
    x_all, y_all = ids[: n * B].view(B, n), ids[1: n * B + 1].view(B, n)
    torch.manual_seed(0)
    emb, lstm, head = nn.Embedding(len(vocab), 64).to(device), nn.LSTM(64, H, LAYERS, batch_first=True).to(device), \
        nn.Linear(H, len(vocab)).to(device)
    params = [*emb.parameters(), *lstm.parameters(), *head.parameters()]
    opt = torch.optim.Adam(params, lr=2e-3)
    state, t = None, 0

    def run(k: int) -> None:
        nonlocal state, t
        for _ in range(k):
            if (t + 1) * L > n:
                t, state = 0, None
            x = x_all[:, t * L:(t + 1) * L].to(device)
            y = y_all[:, t * L:(t + 1) * L].to(device)
            out, state = lstm(emb(x), state)
            state = tuple(s.detach() for s in state)
            loss = nn.functional.cross_entropy(head(out).reshape(-1, len(vocab)), y.reshape(-1))
            opt.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(params, 5.0)
            opt.step()
            loss.item()
            t += 1

    return rate(run, steps, warmup=50, device=device) * B * L


def runner_rate(path: str, steps: int, *extra: str) -> float:
    _, rows = run_runner("experiment=char_lstm_shakespeare", f"dataset.path={path}", "device=gpu",
                         f"trainer.max_steps={steps}", f"trainer.log_every_n_steps={max(steps // 8, 1)}",
                         "trainer.progress=none", *extra)
    return steady_rate(rows, "tokens", skip=2)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--text", default=str(ROOT / ".gpu_data" / "tinyshakespeare" / "input.txt"))
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = torch.device("cuda")
    ceilings = device_ceilings(device)
    text = open(args.text, encoding="utf-8").read()
    r = {"ceilings": ceilings, "a_hand_fp32": hand_loop(text, device, args.steps)}
    r["c_runner_fp32"] = runner_rate(args.text, args.steps)
    r["c_runner_bf16"] = runner_rate(args.text, args.steps, "trainer.precision=bf16")
    r["c_runner_graph"] = runner_rate(args.text, args.steps * 2, "trainer.cuda_graph=true")
    r["c_runner_graph_bf16"] = runner_rate(args.text, args.steps * 2, "trainer.cuda_graph=true", "trainer.precision=bf16")
    print(json.dumps(r, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(r, f, indent=2)
    print(f"char-LSTM 2x128 seq 50 batch 50 on {ceilings.get('gpu')}")
    print(table([("(a) hand loop fp32", r["a_hand_fp32"], "tok/s"), ("(c) runner fp32", r["c_runner_fp32"], "tok/s"),
                 ("(c) runner bf16", r["c_runner_bf16"], "tok/s"), ("(c) runner cuda_graph", r["c_runner_graph"], "tok/s"),
                 ("(c) runner cuda_graph bf16", r["c_runner_graph_bf16"], "tok/s")], r["a_hand_fp32"]))


if __name__ == "__main__":
    main()
