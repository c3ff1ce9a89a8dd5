#!/usr/bin/env python3
"""What a Python forward call adds over the C++ call, at size S (B 4, T 64, C 128, NH 4,
V 256, one block): `Model.forward` timed from Python against the library call's own
seconds inside it (`wall_s`), in the same calls; the median of the differences and of the
library's time, in microseconds. PYTHONPATH=build/python python3 experiments/python_overhead.py"""
import statistics
import time

import numpy as np

import flowloop


def main(calls=400):
    m = flowloop.Model.init(vocab=256, context=64, d_model=128, n_head=4, n_block=1, depth=1, seed=0)
    tokens = np.random.default_rng(0).integers(0, 256, size=(4, 64)).astype(np.int32)
    for _ in range(20):
        m.forward(tokens, loops=1)
    extra, inner = [], []
    for _ in range(calls):
        t0 = time.perf_counter()
        out = m.forward(tokens, loops=1)
        outer = time.perf_counter() - t0
        extra.append(outer - out["wall_s"])
        inner.append(out["wall_s"])
    print(f"size S, loop 1: the library call {statistics.median(inner) * 1e6:.0f} us, the binding adds "
          f"{statistics.median(extra) * 1e6:.1f} us (median of {calls}; p90 "
          f"{sorted(extra)[int(0.9 * calls)] * 1e6:.1f} us)")


if __name__ == "__main__":
    main()
