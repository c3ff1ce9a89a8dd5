"""Llama-family benchmarks against transformers (./run.sh hf-bench), side by side in one run.

  hf_bench.py forward [--rounds R] [--tokens T]
      A forward of a Llama-shape model at SmolLM2-135M's width and depth (hidden 576, 30
      layers, 9 heads, 3 key/value heads, MLP 1536, vocabulary 49152, tied head; random
      weights) on 1 x T tokens: flowloop (Model.from_pretrained, the Python module) against
      transformers' eager forward, alternating in one process, each at 1 and at 2 threads;
      tokens/s at each side's best thread count and their ratio, flowloop's GFLOP/s, and the
      two sides' logits against each other.
  hf_bench.py load [--dir DIR]
      Peak memory and seconds of `flowloop forward` loading a BF16 checkpoint of 1.4B
      parameters (Ouro-1.4B's shape: hidden 2048, 24 layers, 16 heads, MLP 5632, vocabulary
      49152, untied head; random weights written here in shards), against the float32
      weights' size.

Needs the Hugging Face test environment (BUILD/hf-venv: transformers on Debian's torch) and
the Python module on PYTHONPATH; FLOWLOOP_CLI names the flowloop command.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

SMOL = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
            num_key_value_heads=3, max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=100000.0,
            tie_word_embeddings=True)
OURO_14B = dict(vocab_size=49152, hidden_size=2048, intermediate_size=5632, num_hidden_layers=24,
                num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=4096, rms_norm_eps=1e-6,
                rope_theta=1000000.0, tie_word_embeddings=False)


def forward_flops(c, T):
    """Products only (2 per multiply-add): projections, attention's two T x T products, head."""
    C, F, L, V = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
    D = C // c["num_attention_heads"]
    q, kv = c["num_attention_heads"] * D, c["num_key_value_heads"] * D
    per_layer = 2 * T * C * (q + 2 * kv) + 2 * T * q * C + 2 * T * 3 * C * F + 4 * T * T * q
    return L * per_layer + 2 * T * C * V


def forward_child(args):
    import torch
    import transformers
    import flowloop
    threads = int(os.environ["OMP_NUM_THREADS"])
    torch.set_num_threads(threads)
    fl = flowloop.Model.from_pretrained(args.dir)
    hf = transformers.AutoModelForCausalLM.from_pretrained(args.dir, torch_dtype=torch.float32).eval()
    tokens = np.random.default_rng(0).integers(0, SMOL["vocab_size"], size=(1, args.tokens))
    tt = torch.tensor(tokens)

    def run_fl():
        return fl.forward(tokens)["logits"]

    def run_hf():
        with torch.no_grad():
            return hf(tt, use_cache=False).logits.numpy()

    a, b = run_fl(), run_hf()  # warm-up, and the two sides' agreement
    rel = float(np.max(np.abs(a - b)) / np.max(np.abs(b)))
    tf, th = [], []
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        run_fl()
        tf.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        run_hf()
        th.append(time.perf_counter() - t0)
    print(json.dumps({"threads": threads, "flowloop_s": statistics.median(tf), "torch_s": statistics.median(th),
                      "rel_diff": rel}))


def forward(args):
    import torch
    import transformers
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMOL)).eval()
        model.save_pretrained(tmp, safe_serialization=True)
        del model
        rows = []
        for threads in (1, 2):
            env = dict(os.environ, OMP_NUM_THREADS=str(threads))
            out = subprocess.run([sys.executable, __file__, "_forward_child", "--dir", tmp, "--rounds",
                                  str(args.rounds), "--tokens", str(args.tokens)], env=env, capture_output=True,
                                 text=True, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    best_fl = min(rows, key=lambda r: r["flowloop_s"])
    best_hf = min(rows, key=lambda r: r["torch_s"])
    fl_tps, hf_tps = args.tokens / best_fl["flowloop_s"], args.tokens / best_hf["torch_s"]
    gflops = forward_flops(SMOL, args.tokens) / best_fl["flowloop_s"] / 1e9
    print(json.dumps({"model": "SmolLM2-135M shape, random weights", "tokens": args.tokens,
                      "flowloop_tokens_per_s": round(fl_tps, 1), "flowloop_threads": best_fl["threads"],
                      "transformers_tokens_per_s": round(hf_tps, 1), "transformers_threads": best_hf["threads"],
                      "ratio": round(fl_tps / hf_tps, 3), "flowloop_gflops": round(gflops, 1),
                      "logits_rel_diff": max(r["rel_diff"] for r in rows)}))


def load(args):
    import torch
    from safetensors.torch import save_file
    own = args.dir is None
    d = args.dir or tempfile.mkdtemp(prefix="flowloop_load_")
    os.makedirs(d, exist_ok=True)
    c = OURO_14B
    C, F, L, V, H = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"], \
        c["num_attention_heads"]
    D = C // H
    shapes = {"model.embed_tokens.weight": (V, C), "model.norm.weight": (C,), "lm_head.weight": (V, C)}
    for i in range(L):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (C,), p + "post_attention_layernorm.weight": (C,),
                       p + "self_attn.q_proj.weight": (H * D, C), p + "self_attn.k_proj.weight": (c[
                           "num_key_value_heads"] * D, C), p + "self_attn.v_proj.weight": (c[
                               "num_key_value_heads"] * D, C), p + "self_attn.o_proj.weight": (C, H * D),
                       p + "mlp.gate_proj.weight": (F, C), p + "mlp.up_proj.weight": (F, C),
                       p + "mlp.down_proj.weight": (C, F)})
    n_params = sum(int(np.prod(s)) for s in shapes.values())
    if not os.path.exists(os.path.join(d, "config.json")):
        g = torch.Generator().manual_seed(0)
        shard, shards, weight_map, size = {}, [], {}, 0
        names = list(shapes)

        def flush():
            nonlocal shard, size
            name = f"model-{len(shards) + 1:05d}.safetensors"
            save_file(shard, os.path.join(d, name), metadata={"format": "pt"})
            for k in shard:
                weight_map[k] = name
            shards.append(name)
            shard, size = {}, 0

        for k in names:
            s = shapes[k]
            t = (torch.randn(*s, generator=g) * 0.02).to(torch.bfloat16) if len(s) == 2 else torch.ones(s).to(
                torch.bfloat16)
            shard[k] = t
            size += t.numel() * 2
            if size > (1 << 30):
                flush()
        if shard:
            flush()
        with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": n_params * 2}, "weight_map": weight_map}, f)
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump(dict(c, model_type="llama", architectures=["LlamaForCausalLM"], hidden_act="silu",
                           torch_dtype="bfloat16"), f)
    tok = os.path.join(d, "tokens.json")
    with open(tok, "w") as f:
        json.dump({"tokens": [[1, 2, 3, 4]]}, f)
    cli = os.environ.get("FLOWLOOP_CLI", "flowloop")
    t0 = time.perf_counter()
    subprocess.run([cli, "forward", "-m", d, "--tokens", tok, "-o", os.path.join(d, "out.json"), "--device", "cpu"],
                   check=True, capture_output=True)
    secs = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # kB on Linux
    f32 = n_params * 4
    print(json.dumps({"parameters": n_params, "bf16_file_bytes": n_params * 2, "float32_weights_bytes": f32,
                      "peak_rss_bytes": peak, "peak_over_float32": round(peak / f32, 3),
                      "seconds_load_and_forward_4_tokens": round(secs, 2)}))
    if own:
        import shutil
        shutil.rmtree(d)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["forward", "load", "_forward_child"])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--dir")
    args = p.parse_args()
    {"forward": forward, "load": load, "_forward_child": forward_child}[args.mode](args)


if __name__ == "__main__":
    main()
