#!/usr/bin/env python3
"""Two builds of flowloop side by side: the same `flowloop bench` commands, run by each
binary in alternating rounds (A B, then B A, ...) in one run, so that the machine's drift
falls on both alike; prints the median of every time each reports, and the speed of B
relative to A (above 1: B is faster; for tokens_per_s, B's over A's).

  compare_builds.py A_FLOWLOOP B_FLOWLOOP ROUNDS "bench field --size S --threads 1 --time-cond" ...

Each further argument is one bench command line (without the binary). Example, a branch
against the landed main built in another directory:

  experiments/compare_builds.py ../main/build/flowloop build/flowloop 4 \\
    "bench field --size M --threads 2 --time-cond --seconds 2" "bench train --size S --loops 4 --seconds 1"
"""
import json
import shlex
import statistics
import subprocess
import sys


def run(binary, args):
    out = subprocess.run([binary] + args, capture_output=True, text=True, check=True).stdout
    lines = [l for l in out.splitlines() if l.startswith("{")]
    if not lines:
        raise SystemExit(f"{binary} {' '.join(args)}: no JSON line")
    return json.loads(lines[-1])


def times(j, prefix=""):
    """Every timing of a bench record: *_ms, ms, ms_per_eval, tokens_per_s (nested records too)."""
    r = {}
    for k, v in j.items():
        if isinstance(v, dict):
            r.update(times(v, prefix + k + "."))
        elif isinstance(v, (int, float)) and (k.endswith("_ms") or k in ("ms", "ms_per_eval", "tokens_per_s")):
            r[prefix + k] = float(v)
    return r


def main():
    if len(sys.argv) < 5:
        raise SystemExit(__doc__)
    a, b, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
    for cmd in sys.argv[4:]:
        args = shlex.split(cmd)
        got = {"A": [], "B": []}
        for i in range(rounds):
            order = (("A", a), ("B", b)) if i % 2 == 0 else (("B", b), ("A", a))
            for name, binary in order:
                got[name].append(times(run(binary, args)))
        print(cmd)
        for k in got["A"][0]:
            ma = statistics.median(r[k] for r in got["A"])
            mb = statistics.median(r[k] for r in got["B"])
            speed = mb / ma if k == "tokens_per_s" else ma / mb
            print(f"  {k:26s} A {ma:11.3f}  B {mb:11.3f}  speed B/A {speed:.3f}")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
