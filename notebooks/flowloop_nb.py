"""Readers and plots for the notebooks: they only read what flowloop commands wrote.

`flowloop compare --out DIR`: compare.csv, pareto.csv, compare_meta.json.
`flowloop sweep --out DIR`: sweep.csv, sweep_train.csv; `flowloop study`: curves.csv.
`flowloop trajectory --out DIR`: lens.csv, steps.csv, pca.csv, states.safetensors,
trajectory_meta.json. Standard library, numpy and matplotlib only; nothing here is
part of the C++ library.
"""
import csv
import json
import math
import os
import struct
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent  # the repository

TEXT_COLUMNS = {"regime", "mode", "solver", "exit_rule", "status", "message", "source", "sampler",
                "train_regime", "eval_regime", "dir", "arm"}
FAMILIES = ["loop", "euler", "midpoint", "rk4", "bosh3", "dopri5", "tsit5",
            "coupled", "exit q", "exit delta", "terminal"]
_PALETTE = ["#1f77b4", "#8c8c8c", "#bcbd22", "#2ca02c", "#9467bd", "#d62728", "#ff7f0e",
            "#8c564b", "#e377c2", "#17becf", "#393b79"]


def path(p):
    """A path given to a notebook: relative paths are taken from the repository root."""
    p = Path(p).expanduser()
    return p if p.is_absolute() else ROOT / p


def env_dirs(name, default):
    """The directories in environment variable NAME (':'-separated), else DEFAULT."""
    raw = os.environ.get(name, "")
    items = [s for s in raw.split(os.pathsep) if s] or list(default)
    dirs = [path(s) for s in items]
    for d in dirs:
        if not d.is_dir():
            raise FileNotFoundError(f"{name}: no directory {d}")
    return dirs


def figures_dir(default="notebooks/figures"):
    d = path(os.environ.get("FLOWLOOP_FIGURES") or default)
    d.mkdir(parents=True, exist_ok=True)
    return d


def read_csv(file):
    """Rows as dicts; every column not in TEXT_COLUMNS as a float ('nan' stays NaN)."""
    with open(file, newline="") as f:
        return [{k: (v if k in TEXT_COLUMNS else float(v)) for k, v in row.items()}
                for row in csv.DictReader(f)]


def column(rows, key):
    return np.array([r[key] for r in rows], dtype=float)


# ---- flowloop compare ---------------------------------------------------------------

def read_compare(d):
    d = Path(d)
    meta = json.loads((d / "compare_meta.json").read_text())
    rows, front = read_csv(d / "compare.csv"), read_csv(d / "pareto.csv")
    for r in rows + front:
        r["family"] = family(r)
        r["ok"] = r["status"] == "ok"
    bad = [r["regime"] for r in front if not r["ok"]]
    if bad:
        raise ValueError(f"{d}/pareto.csv holds failed rows: {bad}")
    return {"dir": d, "meta": meta, "rows": rows, "front": front, "label": trained_label(meta)}


def family(r):
    """The colour group of a compare row."""
    if r["exit_rule"]:
        return "exit " + r["exit_rule"]
    if r["terminal"] > 0:
        return "terminal"
    if r["coupled"]:
        return "coupled"
    return "loop" if r["mode"] == "loop" else r["solver"]


def family_colors(families):
    extra = iter(c for c in ["#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94"])
    return {f: (_PALETTE[FAMILIES.index(f)] if f in FAMILIES else next(extra, "#000000"))
            for f in families}


def depth_label(t):
    """A depth spec as JSON ("trained" of compare_meta.json, "depth" of trajectory_meta.json)."""
    mode = t.get("mode")
    if mode == "loop":
        return f"loop {t['loops']}"
    if mode == "fixed":
        return f"{t['solver']} {t['solver_steps']} steps on [0, {t['t1']:g}]"
    if mode == "adaptive":
        return (f"{t['solver']} rtol {t['rtol']:g} on [0, {t['t1']:g}]"
                + (" coupled" if t.get("batch_coupled") else ""))
    return str(t)


def data_label(data):
    return " ".join([str(data.get("task") or data.get("text", "?"))] +
                    [f"{k}={v}" for k, v in data.items() if k not in ("task", "text", "seed")])


def trained_label(meta):
    t = meta.get("trained", {})
    kind = "looped" if t.get("mode") == "loop" else "ODE depth"
    return f"{kind}: {depth_label(t)}"


def is_trained_regime(r, t):
    """Whether compare row R is the regime the model was trained at (spec T)."""
    if r["exit_rule"] or r["terminal"] > 0:
        return False
    if t.get("mode") == "loop":
        return r["mode"] == "loop" and r["steps"] == t["loops"]
    if r["mode"] != "solve" or r["solver"] != t.get("solver"):
        return False
    if t["mode"] == "fixed":
        return r["steps"] == t["solver_steps"]
    return (math.isclose(r["rtol"], t["rtol"], rel_tol=1e-6)
            and bool(r["coupled"]) == bool(t.get("batch_coupled")))


def best_per_family(rows):
    """Per family in FAMILIES order: its most accurate ok row (the cheaper on ties), or its
    first row when every one failed."""
    out = []
    fams = sorted({r["family"] for r in rows},
                  key=lambda f: (FAMILIES.index(f) if f in FAMILIES else len(FAMILIES), f))
    for f in fams:
        mine = [r for r in rows if r["family"] == f]
        ok = [r for r in mine if r["ok"] and math.isfinite(r["accuracy"])]
        out.append(max(ok, key=lambda r: (r["accuracy"], -r["nfe_mean"])) if ok else mine[0])
    return out


def markdown_table(rows, columns):
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r[c]) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def plot_compare(ax, cmp, metric="accuracy", annotate=True):
    """One model's regimes: METRIC against mean NFE (log x), a colour per family, failed
    rows as crosses, the trained regime ringed, and (for accuracy) the Pareto front of
    pareto.csv as a step line."""
    rows = cmp["rows"]
    colors = family_colors(sorted({r["family"] for r in rows}, key=lambda f: (
        FAMILIES.index(f) if f in FAMILIES else len(FAMILIES), f)))
    for f, c in colors.items():
        mine = [r for r in rows if r["family"] == f]
        for ok, marker in ((True, "o"), (False, "x")):
            sel = [r for r in mine if r["ok"] == ok]
            if sel:
                y = np.nan_to_num(column(sel, metric), nan=0.0)
                ax.scatter(column(sel, "nfe_mean"), y, c=c, marker=marker, s=28 if ok else 48,
                           alpha=0.85, label=f if ok or not any(r["ok"] for r in mine) else None,
                           zorder=3)
    trained = [r for r in rows if is_trained_regime(r, cmp["meta"].get("trained", {}))]
    if trained:
        ax.scatter(column(trained, "nfe_mean"), column(trained, metric), s=150, facecolors="none",
                   edgecolors="k", linewidths=1.2, label="trained regime", zorder=4)
    if metric == "accuracy" and cmp["front"]:
        front = sorted(cmp["front"], key=lambda r: r["nfe_mean"])
        x, y = column(front, "nfe_mean"), column(front, "accuracy")
        xmax = max(column(rows, "nfe_mean")[np.isfinite(column(rows, "nfe_mean"))].max(), x[-1])
        ax.step(np.append(x, xmax), np.append(y, y[-1]), where="post", color="k", lw=1.2,
                label="Pareto front", zorder=2)
        if annotate:
            for r in front:
                ax.annotate(r["regime"], (r["nfe_mean"], r["accuracy"]), fontsize=7,
                            xytext=(3, -10), textcoords="offset points")
    if any(not r["ok"] for r in rows):
        ax.scatter([], [], c="k", marker="x", label="failed (status != ok)")
    ax.set_xscale("log")
    ax.set_xlabel("mean NFE per sequence")
    ax.set_ylabel(metric)
    ax.set_title(f"{cmp['label']}\n{data_label(cmp['meta'].get('data', {}))}, "
                 f"{cmp['meta'].get('examples', '?')} examples", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)


def legend_right(fig, axes, **kw):
    """One legend for all panels (each label once), right of the last."""
    seen = {}
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(lab, h)
    axes[-1].legend(seen.values(), seen.keys(), loc="center left", bbox_to_anchor=(1.01, 0.5), **kw)


# ---- flowloop trajectory ------------------------------------------------------------

def read_safetensors(file):
    """{name: numpy array} and the metadata of a safetensors file (F32/F64/I64)."""
    raw = Path(file).read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    meta = header.pop("__metadata__", {})
    dtypes = {"F32": "<f4", "F64": "<f8", "I64": "<i8", "I32": "<i4"}
    out = {}
    for name, t in header.items():
        a, b = t["data_offsets"]
        out[name] = np.frombuffer(raw[8 + n + a:8 + n + b], dtype=dtypes[t["dtype"]]).reshape(t["shape"])
    return out, meta


def read_trajectory(d):
    d = Path(d)
    meta = json.loads((d / "trajectory_meta.json").read_text())
    tr = {"dir": d, "meta": meta, "lens": read_csv(d / "lens.csv"), "steps": read_csv(d / "steps.csv"),
          "pca": read_csv(d / "pca.csv")}
    tr["label"] = f"{meta.get('source', '?')}: {depth_label(meta.get('depth', {}))} ({Path(meta.get('model', '?')).parent.name})"
    return tr


def read_flow_student(d):
    """A `flowloop flow-match train --out DIR` directory after `flow-match eval --csv DIR/eval.csv`:
    its configuration, training metrics and evaluation rows."""
    d = Path(d)
    cfg = json.loads((d / "config.json").read_text())
    metrics = [json.loads(l) for l in (d / "metrics.jsonl").read_text().splitlines() if l.strip()]
    rows = read_csv(d / "eval.csv")
    label = cfg["matcher"]
    if cfg.get("coupling", "identity") != "identity":
        label += f" ({cfg['coupling']})"
    if cfg.get("state_stride", 1) > 1:
        label += f" (every {cfg['state_stride']}th state)" if cfg["state_stride"] > 3 else \
            f" (every {['', '', '2nd', '3rd'][cfg['state_stride']]} state)"
    if cfg.get("decode_weight", 0) > 0:
        label += f" + decode {cfg['decode_weight']:g}"
    if cfg.get("reflow", 0) > 0:
        label += f", reflow {cfg['reflow']}"
    if cfg.get("shortcut", False):
        label += " + shortcut"
    return {"dir": d, "config": cfg, "metrics": metrics, "rows": rows, "label": label}


def sampler_family(name):
    """'euler:2' -> 'euler', 'dopri5:0.001' -> 'dopri5', 'shortcut:1' -> 'shortcut' (N Euler
    steps told their step), 'teacher-loop' stays."""
    return name.split(":")[0]
