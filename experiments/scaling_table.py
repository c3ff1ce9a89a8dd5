#!/usr/bin/env python3
"""The data-parallel scaling table of `./run.sh scaling`. For each run pair NAME_np1 and
NAME_np2 under DIR: the median tokens/s over the steps after the first 5 (1 process with
2 threads against 2 MPI ranks with 1 thread each), the allreduce's median share of a step
on 2 ranks, the load imbalance, the gradient bytes and FLOPs per step, and the projected
speed-up of the same global batch on 16 nodes linked at 100 Gb/s."""
import json
import statistics
import sys
from pathlib import Path

NODES, BANDWIDTH, LATENCY = 16, 100e9 / 8, 5e-6  # 100 Gb/s links, 5 us per message


def steps(run):
    lines = [json.loads(l) for l in open(run / "metrics.jsonl")]
    return lines[5:] if len(lines) > 10 else lines


def main(root):
    root = Path(root)
    names = sorted({p.name.rsplit("_np", 1)[0] for p in root.glob("*_np1")})
    print("| run | np 1 tokens/s | np 2 tokens/s | np 2 / np 1 | allreduce share (np 2) | load imbalance | "
          "gradient MB | GFLOP per step | projected on 16 nodes |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in names:
        one, two = steps(root / f"{name}_np1"), steps(root / f"{name}_np2")
        t1 = statistics.median(l["tokens_per_s"] for l in one)
        t2 = statistics.median(l["tokens_per_s"] for l in two)
        share = statistics.median(l["allreduce_s"] / l["step_s"] for l in two)
        imbalance = statistics.median(l["load_imbalance"] for l in two)
        grad_bytes = two[0]["gradient_bytes"]
        flops = statistics.median(l["flops"] for l in one)
        tokens = two[0]["tokens_per_s"] * two[0]["step_s"]  # the global batch's tokens
        # one node's seconds for the global batch; on N nodes the compute splits N ways
        # (times the slowest rank's excess) and a ring allreduce moves 2 (N-1)/N of the
        # gradient per rank, with 2 (N-1) message latencies
        whole = tokens / t1
        compute = whole / NODES * imbalance
        comm = 2 * (NODES - 1) / NODES * grad_bytes / BANDWIDTH + 2 * (NODES - 1) * LATENCY
        print(f"| {name} | {t1:.0f} | {t2:.0f} | {t2 / t1:.2f} | {share:.1%} | {imbalance:.3f} | "
              f"{grad_bytes / 1e6:.2f} | {flops / 1e9:.2f} | {whole / (compute + comm):.1f}x "
              f"(compute {compute * 1e3:.2f} ms + allreduce {comm * 1e3:.3f} ms a step) |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "build/scaling")
