"""What the DDP stop vote costs (runner/engine/signals.py): two gloo processes on this machine,
each calling ``SignalFlag.agreed()`` once per simulated window of ``--window-ms`` of other work,
against the same loop without the vote, side by side. Prints the added time per window.
Usage: python benchmarks/stop_vote.py [--windows 2000] [--window-ms 2]"""
from __future__ import annotations

import argparse
import os
import socket
import sys
import time

import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def work(ms: float) -> None:
    end = time.perf_counter() + ms / 1000  # busy, not sleep: a sleeping thread's wake-up would be timed too
    while time.perf_counter() < end:
        pass


def worker(rank: int, port: int, windows: int, window_ms: float, out) -> None:
    import torch.distributed as dist

    from runner.engine.signals import SignalFlag

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    flag = SignalFlag(distributed=True)
    times = {}
    for rounds in range(3):  # alternate, so that both see the same machine load
        for name, vote in (("without", False), ("with vote", True)):
            dist.barrier()
            start = time.perf_counter()
            for _ in range(windows):
                work(window_ms)
                if vote:
                    flag.agreed()
            times.setdefault(name, []).append((time.perf_counter() - start) / windows * 1e6)
    if rank == 0:
        out.update({name: sorted(t)[1] for name, t in times.items()})  # medians of 3
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--windows", type=int, default=2000)
    parser.add_argument("--window-ms", type=float, default=2.0)
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.get_context("spawn").Manager().dict()
    mp.start_processes(worker, args=(port, args.windows, args.window_ms, out), nprocs=2, start_method="spawn")
    print(f"window {args.window_ms} ms: without vote {out['without']:.0f} us, with vote {out['with vote']:.0f} us, "
          f"added {out['with vote'] - out['without']:.0f} us per window")


if __name__ == "__main__":
    main()
