#!/usr/bin/env python3
"""PyTorch peer of flowloop, built from model-spec.md independently of the C++ code.

  peer_torch.py bench  --flowloop BIN [--sizes S M] [--threads 1 2]
      Times one field evaluation f(h) = Block(h) - h in PyTorch eager (float32,
      inference mode) and `flowloop bench field` side by side, in interleaved
      rounds, at every thread setting; prints one JSON line per measurement and a
      summary with the ratio at the best thread setting of each.
  peer_torch.py solve  --flowloop BIN [--sizes S M] [--threads 1 2]
      A dopri5 solve of the field on t in [0, 4] (rtol 1e-3, atol 1e-4) from the
      embedding of the same tokens with the same weights: torchdiffeq's odeint
      against `flowloop bench solve`, flowloop both in its default mode (Hairer's
      PI controller, per-sequence steps) and in torchdiffeq's (Shampine's error
      weights, I controller, one shared step).
  peer_torch.py train  --flowloop BIN [--sizes M] [--threads 1 2]
      One training step (dopri5 solve on [0, 4], rtol 1e-3, atol 1e-4, mean
      cross-entropy of the tied readout, gradient of every parameter): PyTorch +
      torchdiffeq with backprop through odeint and with odeint_adjoint, against
      `flowloop bench train --grad backprop` and `--grad adjoint`.
  peer_torch.py loops  --flowloop BIN [--sizes S] [--threads 1 2]
      Training throughput of the 4-loop model (loop 4, mean cross-entropy, full
      backward, AdamW step): tokens per second of PyTorch eager against
      `flowloop bench train --loops 4 --adamw`: both time forward, backward and
      the update.
  peer_torch.py wp     --flowloop BIN [--sizes S M] [--rtols 1e-2,...,1e-6]
      Work-precision: torchdiffeq's dopri5 at each tolerance (atol = rtol / 10)
      beside `flowloop bench wp` on the same weights and tokens, both against
      flowloop's double-precision reference (dopri5, rtol 1e-10) in the same run;
      the summary gives flowloop's time at each error torchdiffeq reaches.
  --device cuda (bench, solve, train): PyTorch on the GPU (timed to its synchronize) and
      flowloop with --device cuda, on the same GPU.
  peer_torch.py check  --flowloop BIN [--workdir DIR]
      Checkpoint interchange: a flowloop checkpoint loaded here gives flowloop's
      logits, and a checkpoint written here loads in flowloop and gives ours.
"""
import argparse
import json
import math
import os
import struct
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

SIZES = {"S": (4, 64, 128, 4, 256, 1), "M": (8, 128, 256, 8, 256, 1), "G": (32, 512, 1024, 16, 512, 1)}


# ---------------------------------------------------------------- safetensors
def read_safetensors(path):
    with open(path, "rb") as f:
        raw = f.read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    meta = header.pop("__metadata__", {})
    data = raw[8 + n :]
    dt = {"F32": np.float32, "F64": np.float64}
    tensors = {}
    for name, e in header.items():
        b, en = e["data_offsets"]
        tensors[name] = torch.from_numpy(
            np.frombuffer(data[b:en], dtype=dt[e["dtype"]]).reshape(e["shape"]).copy())
    return tensors, meta


def write_safetensors(path, tensors, meta):
    header, blobs, off = {"__metadata__": meta}, [], 0
    for name, t in tensors.items():
        b = t.detach().contiguous().numpy().astype(np.float32).tobytes()
        header[name] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    h = json.dumps(header).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))


# ---------------------------------------------------------------- the model (spec)
def layernorm(x, w, b):
    return F.layer_norm(x, (x.shape[-1],), w, b, 1e-5)


def block(x, p, i, nh):
    pre = f"field.h.{i}."
    B, T, C = x.shape
    D = C // nh
    u = layernorm(x, p[pre + "ln_1.weight"], p[pre + "ln_1.bias"])
    qkv = F.linear(u, p[pre + "attn.c_attn.weight"], p[pre + "attn.c_attn.bias"])
    q, k, v = qkv.split(C, dim=2)
    q, k, v = (z.view(B, T, nh, D).transpose(1, 2) for z in (q, k, v))
    att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(D))
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    att = att.masked_fill(~mask, float("-inf")).softmax(dim=-1)
    y = (att @ v).transpose(1, 2).contiguous().view(B, T, C)
    a = F.linear(y, p[pre + "attn.c_proj.weight"], p[pre + "attn.c_proj.bias"])
    x2 = x + a
    u2 = layernorm(x2, p[pre + "ln_2.weight"], p[pre + "ln_2.bias"])
    m = F.linear(F.gelu(F.linear(u2, p[pre + "mlp.c_fc.weight"], p[pre + "mlp.c_fc.bias"]),
                        approximate="tanh"),
                 p[pre + "mlp.c_proj.weight"], p[pre + "mlp.c_proj.bias"])
    return x2 + m


def field(h, p, cfg):
    x = h
    for i in range(cfg["n_block"]):
        x = block(x, p, i, cfg["n_head"])
    return x - h


def logits(tokens, p, cfg, loops):
    T = tokens.shape[1]
    h = p["wte.weight"][tokens] + p["wpe.weight"][:T]
    for _ in range(loops):
        h = h + field(h, p, cfg)
    return layernorm(h, p["ln_f.weight"], p["ln_f.bias"]) @ p["wte.weight"].T


def random_params(cfg, seed):
    g = torch.Generator().manual_seed(seed)
    V, Tm, C, Fd, L = cfg["vocab_size"], cfg["context"], cfg["d_model"], cfg["d_ff"], cfg["n_block"]
    n = lambda *s, sd=0.02: torch.randn(*s, generator=g) * sd
    p = {"wte.weight": n(V, C), "wpe.weight": n(Tm, C)}
    for i in range(L):
        pre = f"field.h.{i}."
        p.update({pre + "ln_1.weight": 1 + n(C, sd=0.1), pre + "ln_1.bias": n(C, sd=0.1),
                  pre + "attn.c_attn.weight": n(3 * C, C), pre + "attn.c_attn.bias": n(3 * C),
                  pre + "attn.c_proj.weight": n(C, C), pre + "attn.c_proj.bias": n(C),
                  pre + "ln_2.weight": 1 + n(C, sd=0.1), pre + "ln_2.bias": n(C, sd=0.1),
                  pre + "mlp.c_fc.weight": n(Fd, C), pre + "mlp.c_fc.bias": n(Fd),
                  pre + "mlp.c_proj.weight": n(C, Fd), pre + "mlp.c_proj.bias": n(C)})
    p["ln_f.weight"] = 1 + n(C, sd=0.1)
    p["ln_f.bias"] = n(C, sd=0.1)
    return p


DEV = "cpu"  # --device: where PyTorch runs, and flowloop's --device


def sync():
    """Waits for the GPU's queued work, so that a timing covers it (no-op on the CPU)."""
    if DEV == "cuda":
        torch.cuda.synchronize()


def to_dev(p):
    return {k: v.to(DEV) for k, v in p.items()}


def flops(B, T, C, L):
    Fd = 4 * C
    return L * (2 * B * T * (3 * C * C + C * C + 2 * C * Fd) + 4 * B * T * T * C)


# ---------------------------------------------------------------- bench
def time_torch(size, threads, seconds):
    B, T, C, NH, V, L = SIZES[size]
    torch.set_num_threads(threads)
    cfg = {"vocab_size": V, "context": T, "d_model": C, "n_head": NH, "d_ff": 4 * C, "n_block": L}
    p = to_dev(random_params(cfg, 0))
    h = torch.randn(B, T, C).to(DEV)
    times = []
    with torch.inference_mode():
        for _ in range(3):
            field(h, p, cfg)
        sync()
        start = time.perf_counter()
        while len(times) < 10 or time.perf_counter() - start < seconds:
            t0 = time.perf_counter()
            field(h, p, cfg)
            sync()
            times.append(time.perf_counter() - t0)
    ms = 1e3 * float(np.median(times))
    return {"impl": "pytorch", "device": DEV, "size": size, "threads": threads, "ms_per_eval": ms,
            "gflops": flops(B, T, C, L) / (ms * 1e6), "torch": torch.__version__}


def time_flowloop(binary, size, threads, seconds):
    out = subprocess.run([binary, "bench", "field", "--size", size, "--threads", str(threads),
                          "--seconds", str(seconds), "--device", DEV], check=True, capture_output=True, text=True)
    r = json.loads(out.stdout)
    r["impl"] = "flowloop"
    return r


def bench(args):
    summary = {}
    for size in args.sizes:
        best = {"pytorch": {}, "flowloop": {}}
        for threads in args.threads:
            runs = {"pytorch": [], "flowloop": []}
            for _ in range(args.rounds):  # interleaved, so both see the same machine
                runs["pytorch"].append(time_torch(size, threads, args.seconds))
                runs["flowloop"].append(time_flowloop(args.flowloop, size, threads, args.seconds))
            for impl, rs in runs.items():
                ms = float(np.median([r["ms_per_eval"] for r in rs]))
                rec = dict(rs[0], ms_per_eval=ms, gflops=flops(*SIZES[size][:3], SIZES[size][5]) / (ms * 1e6),
                           rounds=len(rs))
                print(json.dumps(rec), flush=True)
                if not best[impl] or ms < best[impl]["ms_per_eval"]:
                    best[impl] = rec
        fl, pt = best["flowloop"], best["pytorch"]
        summary[size] = {"flowloop_ms": fl["ms_per_eval"], "flowloop_threads": fl["threads"],
                         "flowloop_gflops": fl["gflops"], "gemm_gflops": fl.get("gemm_gflops"),
                         "pytorch_ms": pt["ms_per_eval"], "pytorch_threads": pt["threads"],
                         "pytorch_gflops": pt["gflops"],
                         "speedup": pt["ms_per_eval"] / fl["ms_per_eval"]}
    print(json.dumps({"summary": summary}))


# ---------------------------------------------------------------- shared set-up
def workdir(args):
    d = args.workdir or tempfile.mkdtemp(prefix="flowloop_peer_")
    os.makedirs(d, exist_ok=True)
    return d


def size_setup(args, size, d, seed, with_targets):
    """flowloop init at the size (seed 1), and B x T random tokens (and next-token targets)."""
    B, T, C, NH, V, L = SIZES[size]
    model = os.path.join(d, f"model_{size}.safetensors")
    toks = os.path.join(d, f"tokens_{size}_{seed}.json")
    subprocess.run([args.flowloop, "init", "--vocab", str(V), "--context", str(T), "--d-model", str(C),
                    "--n-head", str(NH), "--n-block", str(L), "--depth", "4", "--seed", "1", "-o", model],
                   check=True, capture_output=True)
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, V, (B, T), generator=g)
    targets = torch.cat([tokens[:, 1:], torch.full((B, 1), -1)], dim=1)
    data = {"tokens": tokens.tolist()}
    if with_targets:
        data["targets"] = targets.tolist()
    with open(toks, "w") as f:
        json.dump(data, f)
    p, meta = read_safetensors(model)
    return model, toks, tokens, targets, p, json.loads(meta["config"])


# ---------------------------------------------------------------- solve
def time_odeint(p, cfg, h0, rtol, atol, seconds):
    """torchdiffeq's dopri5 of the field on [0, 4] from h0, repeated for at least 3 runs
    and `seconds`: the final solution, the evaluations of one solve, the run times."""
    from torchdiffeq import odeint

    nfe = [0]

    def func(t, h):
        nfe[0] += 1
        return field(h, p, cfg)

    times = []
    with torch.inference_mode():
        sync()
        start = time.perf_counter()
        while len(times) < 3 or time.perf_counter() - start < seconds:
            nfe[0] = 0
            t0 = time.perf_counter()
            hs = odeint(func, h0, torch.tensor([0.0, 4.0], device=DEV), rtol=rtol, atol=atol, method="dopri5")
            sync()
            times.append(time.perf_counter() - t0)
    return hs, nfe[0], times


def solve(args):

    d = workdir(args)
    summary = {}
    for size in args.sizes:
        B, T, C, NH, V, L = SIZES[size]
        model, toks, tokens, _, p, cfg = size_setup(args, size, d, 2, False)
        p, tokens = to_dev(p), tokens.to(DEV)
        h0 = p["wte.weight"][tokens] + p["wpe.weight"][:T]
        modes = {"flowloop": [], "flowloop_torchdiffeq_mode": ["--solver", "dopri5-shampine", "--controller", "i",
                                                               "--batch-coupled"]}
        results = {}
        for threads in args.threads:
            for _ in range(args.rounds):
                torch.set_num_threads(threads)
                hs, nfe, times = time_odeint(p, cfg, h0, 1e-3, 1e-4, args.seconds)
                rec = {"impl": "torchdiffeq", "device": DEV, "size": size, "threads": threads,
                       "ms": 1e3 * float(np.median(times)),
                       "nfe": nfe, "h_norm": float(hs[-1].double().norm())}
                results.setdefault("torchdiffeq", []).append(rec)
                print(json.dumps(rec), flush=True)
                for name, extra in modes.items():
                    cmd = [args.flowloop, "bench", "solve", "--size", size, "-m", model, "--tokens", toks,
                           "--solver", "dopri5", "--rtol", "1e-3", "--atol", "1e-4", "--t1", "4",
                           "--threads", str(threads), "--seconds", str(args.seconds), "--device", DEV] + extra
                    if "--solver" in extra:
                        i = cmd.index("--solver")
                        del cmd[i:i + 2]
                    r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
                    r["impl"] = name
                    results.setdefault(name, []).append(r)
                    print(json.dumps(r), flush=True)
        best = {k: min(v, key=lambda r: r["ms"]) for k, v in results.items()}
        td = best["torchdiffeq"]
        summary[size] = {k: {"ms": v["ms"], "nfe": v["nfe"], "threads": v["threads"], "h_norm": v["h_norm"],
                             "speedup_vs_torchdiffeq": td["ms"] / v["ms"],
                             **({"overhead": v["overhead"]} if "overhead" in v else {})}
                         for k, v in best.items()}
    print(json.dumps({"summary": summary}))


# ---------------------------------------------------------------- work-precision
def wp(args):
    """torchdiffeq's dopri5 beside `flowloop bench wp` on the same weights, tokens and
    tolerances (atol = rtol / 10), both measured against flowloop's double-precision
    reference in the same run; then, at each error torchdiffeq reaches, the time
    flowloop's default dopri5 needs for that error (log-log interpolation)."""
    d = workdir(args)
    rtols = [float(r) for r in args.rtols.split(",")]
    summary = {}
    for size in args.sizes:
        model, toks, tokens, _, p, cfg = size_setup(args, size, d, 3, False)
        ref_path = os.path.join(d, f"wp_ref_{size}.safetensors")
        threads = max(args.threads)
        cmd = [args.flowloop, "bench", "wp", "--size", size, "-m", model, "--tokens", toks, "--solvers", "dopri5",
               "--rtols", args.rtols, "--t1", "4", "--threads", str(threads), "--seconds", str(args.seconds),
               "--reference-out", ref_path]
        rows = [json.loads(line) for line in subprocess.run(cmd, check=True, capture_output=True,
                                                             text=True).stdout.splitlines()]
        ref, _ = read_safetensors(ref_path)
        ref = ref["h_t1"].double()
        for r in rows:
            r["impl"] = "flowloop"
            print(json.dumps(r), flush=True)
        fl = [r for r in rows if r["solver"] != "reference"]
        torch.set_num_threads(threads)
        h0 = p["wte.weight"][tokens] + p["wpe.weight"][:tokens.shape[1]]
        td = []
        for rtol in rtols:
            hs, nfe, times = time_odeint(p, cfg, h0, rtol, rtol / 10, args.seconds)
            err = float((hs[-1].double() - ref).norm() / ref.norm())
            rec = {"bench": "wp", "impl": "torchdiffeq", "size": size, "solver": "dopri5", "rtol": rtol,
                   "atol": rtol / 10, "error": err, "nfe": nfe, "ms": 1e3 * float(np.median(times)),
                   "threads": threads}
            td.append(rec)
            print(json.dumps(rec), flush=True)
        # flowloop's time at torchdiffeq's error, where flowloop's curve spans it
        le = np.log([r["error"] for r in fl])
        lt = np.log([r["ms"] for r in fl])
        order = np.argsort(le)
        ratios = []
        for r in td:
            e = np.log(r["error"])
            if le.min() <= e <= le.max():
                t = float(np.exp(np.interp(e, le[order], lt[order])))
                ratios.append({"rtol": r["rtol"], "error": r["error"], "torchdiffeq_ms": r["ms"], "flowloop_ms": t,
                               "flowloop_over_torchdiffeq": t / r["ms"]})
        summary[size] = ratios
    print(json.dumps({"summary": summary}))


# ---------------------------------------------------------------- train
def train(args):
    from torchdiffeq import odeint, odeint_adjoint

    d = workdir(args)
    summary = {}
    for size in args.sizes:
        B, T, C, NH, V, L = SIZES[size]
        model, toks, tokens, targets, raw, cfg = size_setup(args, size, d, 3, True)
        raw, tokens, targets = to_dev(raw), tokens.to(DEV), targets.to(DEV)

        class Field(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.p = torch.nn.ParameterDict({k.replace(".", "_"): torch.nn.Parameter(v.clone())
                                                 for k, v in raw.items()})
                self.nfe = 0

            def params(self):
                return {k: self.p[k.replace(".", "_")] for k in raw}

            def forward(self, t, h):
                self.nfe += 1
                return field(h, self.params(), cfg)

        results = {}
        for threads in args.threads:
            torch.set_num_threads(threads)
            for impl, solve in (("torchdiffeq_backprop", odeint), ("torchdiffeq_adjoint", odeint_adjoint)):
                f = Field()
                times, nfe_f, nfe_b = [], 0, 0
                start = time.perf_counter()
                while len(times) < 2 or time.perf_counter() - start < args.seconds:
                    f.zero_grad()
                    t0 = time.perf_counter()
                    pr = f.params()
                    h0 = pr["wte.weight"][tokens] + pr["wpe.weight"][:T]
                    f.nfe = 0
                    hs = solve(f, h0, torch.tensor([0.0, 4.0], device=DEV), rtol=1e-3, atol=1e-4, method="dopri5")
                    nfe_f = f.nfe
                    logits = layernorm(hs[-1], pr["ln_f.weight"], pr["ln_f.bias"]) @ pr["wte.weight"].T
                    loss = F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1), ignore_index=-1)
                    loss.backward()
                    sync()
                    nfe_b = f.nfe - nfe_f
                    times.append(time.perf_counter() - t0)
                rec = {"impl": impl, "device": DEV, "size": size, "threads": threads, "ms": 1e3 * float(np.median(times)),
                       "nfe_forward": nfe_f, "nfe_backward": nfe_b, "loss": float(loss)}
                results.setdefault(impl, []).append(rec)
                print(json.dumps(rec), flush=True)
            for grad in ("backprop", "adjoint"):
                cmd = [args.flowloop, "bench", "train", "--size", size, "-m", model, "--tokens", toks,
                       "--solver", "dopri5", "--rtol", "1e-3", "--atol", "1e-4", "--t1", "4", "--grad", grad,
                       "--threads", str(threads), "--reps", "2", "--seconds", str(args.seconds), "--device", DEV]
                r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
                r["impl"] = "flowloop_" + grad
                results.setdefault(r["impl"], []).append(r)
                print(json.dumps(r), flush=True)
        best = {k: min(v, key=lambda r: r["ms"]) for k, v in results.items()}
        summary[size] = {k: {kk: v[kk] for kk in ("ms", "threads", "nfe_forward", "nfe_backward", "loss")}
                         for k, v in best.items()}
        summary[size]["speedup_backprop"] = best["torchdiffeq_backprop"]["ms"] / best["flowloop_backprop"]["ms"]
        summary[size]["speedup_adjoint"] = best["torchdiffeq_adjoint"]["ms"] / best["flowloop_adjoint"]["ms"]
    print(json.dumps({"summary": summary}))


# ---------------------------------------------------------------- loops
def loops(args):
    d = workdir(args)
    summary = {}
    for size in args.sizes:
        B, T, C, NH, V, L = SIZES[size]
        model, toks, tokens, targets, raw, cfg = size_setup(args, size, d, 4, True)
        results = {}
        for threads in args.threads:
            torch.set_num_threads(threads)
            p = {k: torch.nn.Parameter(v.clone()) for k, v in raw.items()}
            opt = torch.optim.AdamW(p.values(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
            times = []
            start = time.perf_counter()
            while len(times) < 3 or time.perf_counter() - start < args.seconds:
                t0 = time.perf_counter()
                opt.zero_grad()
                lg = logits(tokens, p, cfg, 4)
                loss = F.cross_entropy(lg.reshape(-1, V), targets.reshape(-1), ignore_index=-1)
                loss.backward()
                opt.step()
                times.append(time.perf_counter() - t0)
            ms = 1e3 * float(np.median(times))
            rec = {"impl": "pytorch", "size": size, "threads": threads, "ms": ms, "tokens_per_s": B * T / (ms / 1e3)}
            results.setdefault("pytorch", []).append(rec)
            print(json.dumps(rec), flush=True)
            cmd = [args.flowloop, "bench", "train", "--size", size, "-m", model, "--tokens", toks, "--loops", "4",
                   "--adamw", "--threads", str(threads), "--seconds", str(args.seconds)]
            r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
            r["impl"] = "flowloop"
            r["tokens_per_s"] = B * T / (r["ms"] / 1e3)
            results.setdefault("flowloop", []).append(r)
            print(json.dumps(r), flush=True)
        best = {k: min(v, key=lambda r: r["ms"]) for k, v in results.items()}
        summary[size] = {k: {"ms": v["ms"], "tokens_per_s": v["tokens_per_s"], "threads": v["threads"]}
                         for k, v in best.items()}
        summary[size]["throughput_ratio"] = best["flowloop"]["tokens_per_s"] / best["pytorch"]["tokens_per_s"]
    print(json.dumps({"summary": summary}))


# ---------------------------------------------------------------- check
def check(args):
    d = workdir(args)
    fl = args.flowloop
    tokens = [[3, 1, 4, 1, 5, 9, 2, 6], [2, 7, 1, 8, 2, 8, 1, 8]]
    with open(os.path.join(d, "tokens.json"), "w") as f:
        json.dump({"tokens": tokens}, f)
    worst = 0.0
    # 1. flowloop writes, PyTorch reads
    subprocess.run([fl, "init", "--vocab", "16", "--context", "8", "--d-model", "32", "--n-head", "4",
                    "--n-block", "2", "--seed", "5", "-o", os.path.join(d, "a.safetensors")],
                   check=True, capture_output=True)
    # 2. PyTorch writes (O(1) weights, so that every part of the math shows), flowloop reads
    cfg = {"vocab_size": 16, "context": 8, "d_model": 32, "n_head": 4, "d_ff": 128, "n_block": 2, "depth": 3}
    p = random_params(cfg, 7)
    p = {k: (v * 10 if v.dim() == 2 else v) for k, v in p.items()}
    write_safetensors(os.path.join(d, "b.safetensors"), p, {"format": "flowloop", "config": json.dumps(cfg)})
    for name in ("a", "b"):
        path = os.path.join(d, name + ".safetensors")
        out = os.path.join(d, name + ".json")
        subprocess.run([fl, "forward", "-m", path, "--tokens", os.path.join(d, "tokens.json"),
                        "--loops", "3", "--precision", "f64", "-o", out], check=True, capture_output=True)
        with open(out) as f:
            ours = torch.tensor(json.load(f)["logits"], dtype=torch.float64)
        tensors, meta = read_safetensors(path)
        c = json.loads(meta["config"])
        ref = logits(torch.tensor(tokens), {k: v.double() for k, v in tensors.items()}, c, 3)
        err = float((ours - ref).abs().max() / ref.abs().max())
        worst = max(worst, err)
        print(json.dumps({"check": name, "writer": "flowloop" if name == "a" else "pytorch",
                          "max_rel_diff_f64": err, "max_logit": float(ref.abs().max())}))
    ok = worst < 1e-10
    print(json.dumps({"check": "interchange", "ok": ok, "worst": worst}))
    return 0 if ok else 1


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", nargs="?", default="bench", choices=["bench", "solve", "train", "loops", "check", "wp"])
    ap.add_argument("--flowloop", default="build/flowloop")
    ap.add_argument("--sizes", nargs="+", default=["S", "M"], choices=list(SIZES))
    ap.add_argument("--threads", nargs="+", type=int, default=sorted({1, os.cpu_count() or 1}))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=1.0)
    ap.add_argument("--workdir")
    ap.add_argument("--rtols", default="1e-2,1e-3,1e-4,1e-5,1e-6", help="wp: tolerances (atol = rtol / 10)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                    help="bench, solve, train: PyTorch on this device and flowloop with --device")
    args = ap.parse_args()
    global DEV
    DEV = args.device
    if args.mode == "check":
        sys.exit(check(args))
    if args.mode == "solve":
        solve(args)
        return
    if args.mode == "train":
        train(args)
        return
    if args.mode == "wp":
        wp(args)
        return
    if args.mode == "loops":
        loops(args)
        return
    bench(args)


if __name__ == "__main__":
    main()
