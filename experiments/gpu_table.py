#!/usr/bin/env python3
"""The GPU figures of `./run.sh gpu-check` as one markdown table (docs/backends.md's).

Reads DIR/field_M.json, DIR/field_G.json (`flowloop bench field --device cuda`) and the
summaries of `experiments/peer_torch.py --device cuda` in DIR/bench.jsonl, DIR/solve.jsonl
and DIR/train.jsonl (their last line, {"summary": ...}), and prints, for sizes M and G,
each measure beside the issue's bar. A missing file leaves its row out and says so.
"""
import json
import sys
from pathlib import Path


def last_json(path):
    lines = [l for l in Path(path).read_text().splitlines() if l.strip().startswith("{")]
    return json.loads(lines[-1]) if lines else None


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: gpu_table.py DIR")
    d = Path(sys.argv[1])
    rows, missing = [], []

    def fmt(x, unit=""):
        return "-" if x is None else (f"{x:.3g}{unit}")

    field = {}
    for size in ("M", "G"):
        p = d / f"field_{size}.json"
        if p.exists():
            field[size] = last_json(p)
        else:
            missing.append(p.name)
    if field:
        rows.append(("field forward: rate / cuBLAS sgemm's (same run)",
                     *(fmt(field.get(s, {}).get("ratio")) for s in ("M", "G")), ">= 0.5 at G"))
        rows.append(("field vjp: rate / sgemm's",
                     *(fmt(field.get(s, {}).get("vjp_ratio")) for s in ("M", "G")), ""))
        rows.append(("field forward ms (time-conditioned)",
                     *(fmt(field.get(s, {}).get("ms_per_eval"), " ms") for s in ("M", "G")), ""))
    peers = {}
    for name in ("bench", "solve", "train"):
        p = d / f"{name}.jsonl"
        s = last_json(p) if p.exists() else None
        if s and "summary" in s:
            peers[name] = s["summary"]
        else:
            missing.append(p.name)
    if "bench" in peers:
        b = peers["bench"]
        rows.append(("field: PyTorch ms / flowloop ms", *(fmt(b.get(s, {}).get("speedup")) for s in ("M", "G")), ""))
    if "solve" in peers:
        sv = peers["solve"]
        rows.append(("dopri5 solve: torchdiffeq ms / flowloop ms",
                     *(fmt(sv.get(s, {}).get("flowloop", {}).get("speedup_vs_torchdiffeq")) for s in ("M", "G")),
                     ">= 5 at M"))
        rows.append(("dopri5 solve ms: flowloop / torchdiffeq",
                     *(f'{fmt(sv.get(s, {}).get("flowloop", {}).get("ms"))} / '
                       f'{fmt(sv.get(s, {}).get("torchdiffeq", {}).get("ms"))}' for s in ("M", "G")), ""))
    if "train" in peers:
        t = peers["train"]
        rows.append(("training step (backprop): PyTorch + torchdiffeq ms / flowloop ms",
                     *(fmt(t.get(s, {}).get("speedup_backprop")) for s in ("M", "G")), ">= 2 at G"))
        rows.append(("training step (adjoint): the same",
                     *(fmt(t.get(s, {}).get("speedup_adjoint")) for s in ("M", "G")), ""))
    print("| measure | M | G | bar |")
    print("|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    if missing:
        print(f"\n(not measured: {', '.join(missing)})")


if __name__ == "__main__":
    main()
