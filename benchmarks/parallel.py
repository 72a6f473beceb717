"""Throughput of exact multi-process sampling (dpmlab.parallel.sample_sharded), 1 vs 2 processes, on the
shipped MNIST network: n samples, DDIM at a fixed NFE, one torch thread per process, end-to-end wall time
(spawning the workers and loading the model in each included), repeated and alternated; the 2-process
result is checked bit-identical to the 1-process one.

    .venv/bin/python benchmarks/parallel.py [--n 64] [--nfe 10] [--reps 3]   # prints a markdown table
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from dpmlab.parallel import sample_sharded

torch.set_num_threads(1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--nfe", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args()
    kw = dict(solver="ddim", nfe=a.nfe, seed=0, batch_size=a.batch_size)
    sample_sharded("mnist", 2, processes=1, **kw | {"batch_size": None})  # warm the parent (load, caches)
    times: dict[int, list[float]] = {1: [], 2: []}
    outs: dict[int, torch.Tensor] = {}
    load = [os.getloadavg()[0]]
    for _ in range(a.reps):
        for p in (1, 2):
            t = time.perf_counter()
            outs[p] = sample_sharded("mnist", a.n, processes=p, threads_per_process=1, **kw)
            times[p].append(time.perf_counter() - t)
            print(f"processes={p}: {times[p][-1]:.2f} s", flush=True)
    load.append(os.getloadavg()[0])
    over = {}
    for p in (1, 2):  # the fixed cost: 2 samples, 1 evaluation — what remains is process start, imports, load
        t = time.perf_counter()
        sample_sharded("mnist", 2, processes=p, solver="ddim", nfe=1, seed=0, batch_size=1)
        over[p] = time.perf_counter() - t
    same = torch.equal(outs[1], outs[2])
    print(
        f"\nmnist, n={a.n}, ddim nfe={a.nfe}, batch_size={a.batch_size}, 1 thread/process, {a.reps} reps, "
        f"{os.cpu_count()} cores, 1-min load average {load[0]:.1f} -> {load[1]:.1f}; "
        f"2-process result bit-identical to 1-process: {same}\n"
    )
    print("| processes | wall s (median, min-max) | samples/s (median) | speed-up vs 1 |")
    print("|---|---|---|---|")
    base = statistics.median(times[1])
    for p in (1, 2):
        med = statistics.median(times[p])
        print(f"| {p} | {med:.2f} ({min(times[p]):.2f}-{max(times[p]):.2f}) | {a.n / med:.1f} | {base / med:.2f}x |")
    print(
        f"\nfixed cost of a call (n=2, nfe=1): 1 process {over[1]:.2f} s, 2 processes {over[2]:.2f} s "
        f"(worker start ~{over[2] - over[1]:.1f} s)"
    )


if __name__ == "__main__":
    main()
