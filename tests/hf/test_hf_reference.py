"""Hugging Face checkpoints against the real client (transformers 4.46 on Debian's torch).

Random tiny Llama and Qwen2 models are built and saved by transformers (F32 in one file, and
BF16 in shards), loaded by `flowloop forward -m DIR`, and their logits compared with
transformers' own forward: relative 1e-5 in float, 1e-10 in double. A model whose layers
a:b are looped K times (--core-layers a:b --loops K) is compared with transformers running
those layers K times, and a flowloop model exported with `flowloop export-hf` with
transformers loading the export.

transformers computes RMSNorm, the rotary angles and the attention softmax in float32 even
for a float64 model; for the double comparison the reference computes them in double
(`double_reference` below), so that both sides are the same math in the same precision.

Run by ctest through the virtual environment that run.sh makes (build/hf-venv); the
environment variable FLOWLOOP_CLI names the flowloop command.
"""

import contextlib
import json
import os
import subprocess

import numpy as np
import pytest
import torch
import transformers
from transformers.models.llama import modeling_llama
from transformers.models.qwen2 import modeling_qwen2

CLI = os.environ.get("FLOWLOOP_CLI", "flowloop")


def rel(a, b):
    """max |a - b| over max |b|: a tolerance that scales with the logits' magnitude."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert np.all(np.isfinite(a)) and np.all(np.isfinite(b))
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def run(*args):
    out = subprocess.run([CLI, *map(str, args)], capture_output=True, text=True)
    assert out.returncode == 0, f"flowloop {' '.join(map(str, args))}\n{out.stdout}\n{out.stderr}"
    return out.stdout


def flowloop_logits(model_dir, tokens, tmp_path, precision="f32", extra=()):
    tok = tmp_path / "tokens.json"
    tok.write_text(json.dumps({"tokens": tokens.tolist()}))
    out = tmp_path / f"logits_{precision}.json"
    run("forward", "-m", model_dir, "--tokens", tok, "-o", out, "--precision", precision, "--device", "cpu", *extra)
    return np.array(json.loads(out.read_text())["logits"])


def tiny(kind, **kw):
    base = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6, rope_theta=10000.0,
                tie_word_embeddings=False)
    base.update(kw)
    if kind == "qwen2":
        return transformers.Qwen2Config(**base)
    return transformers.LlamaConfig(**base)


def build(config, seed):
    torch.manual_seed(seed)
    cls = transformers.Qwen2ForCausalLM if config.model_type == "qwen2" else transformers.LlamaForCausalLM
    model = cls(config).eval()
    with torch.no_grad():  # weights at a scale where every path matters
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.15 * torch.randn_like(p))
    return model


@contextlib.contextmanager
def double_reference():
    """RMSNorm, the rotary angles and the softmax in the model's own dtype (double)."""
    saved = []

    def patch(obj, name, value):
        saved.append((obj, name, getattr(obj, name)))
        setattr(obj, name, value)

    def rms_forward(self, x):
        var = x.pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(var + self.variance_epsilon))

    def rope_forward(self, x, position_ids):
        dim = self.inv_freq.shape[0] * 2
        inv = 1.0 / (self.config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
        freqs = position_ids[:, :, None].to(torch.float64) * inv[None, None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)

    softmax = torch.nn.functional.softmax

    def softmax_own_dtype(x, dim=None, dtype=None, **kw):
        return softmax(x, dim=dim, dtype=None if x.dtype == torch.float64 else dtype, **kw)

    for mod, prefix in ((modeling_llama, "Llama"), (modeling_qwen2, "Qwen2")):
        patch(getattr(mod, prefix + "RMSNorm"), "forward", rms_forward)
        patch(getattr(mod, prefix + "RotaryEmbedding"), "forward", rope_forward)
    patch(torch.nn.functional, "softmax", softmax_own_dtype)
    try:
        yield
    finally:
        for obj, name, value in reversed(saved):
            setattr(obj, name, value)


def reference_logits(model, tokens, double=False):
    with torch.no_grad():
        if not double:
            return model(torch.tensor(tokens), use_cache=False).logits.numpy()
        m = model.double()
        with double_reference():
            out = m(torch.tensor(tokens), use_cache=False).logits.numpy()
        model.float()
        return out


def tokens_for(vocab, B=2, T=12, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, size=(B, T))


CASES = {
    "llama GQA 4:2, untied head, theta 1e4": ("llama", dict()),
    "llama multi-head, tied head, theta 1e6": ("llama", dict(num_key_value_heads=4, tie_word_embeddings=True,
                                                             rope_theta=1e6)),
    "qwen2 q/k/v biases, GQA 4:1, theta 1e6": ("qwen2", dict(num_key_value_heads=1, rope_theta=1e6)),
    "llama attention and MLP biases, head_dim 16": ("llama", dict(attention_bias=True, mlp_bias=True, head_dim=16,
                                                                  rms_norm_eps=1e-5)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_logits_equal_transformers(case, tmp_path):
    kind, kw = CASES[case]
    model = build(tiny(kind, **kw), seed=len(case))
    d = tmp_path / "model"
    model.save_pretrained(d, safe_serialization=True)
    tokens = tokens_for(model.config.vocab_size)
    assert rel(flowloop_logits(d, tokens, tmp_path, "f32"), reference_logits(model, tokens)) < 1e-5
    assert rel(flowloop_logits(d, tokens, tmp_path, "f64"), reference_logits(model, tokens, double=True)) < 1e-10


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_bf16_sharded(kind, tmp_path):
    """BF16 weights in several shards: the same logits as transformers on those weights."""
    model = build(tiny(kind, tie_word_embeddings=kind == "llama"), seed=7)
    model = model.to(torch.bfloat16)
    d = tmp_path / "model"
    model.save_pretrained(d, safe_serialization=True, max_shard_size="40KB")
    assert (d / "model.safetensors.index.json").exists()
    assert len(list(d.glob("model-*.safetensors"))) > 1
    # the bf16 values, exactly, in float32 (loaded again: a cast of the model itself would also
    # round its rotary frequencies to bf16)
    ref = transformers.AutoModelForCausalLM.from_pretrained(d, torch_dtype=torch.float32).eval()
    tokens = tokens_for(ref.config.vocab_size, seed=3)
    assert rel(flowloop_logits(d, tokens, tmp_path, "f32"), reference_logits(ref, tokens)) < 1e-5
    assert rel(flowloop_logits(d, tokens, tmp_path, "f64"), reference_logits(ref, tokens, double=True)) < 1e-10


def test_core_layers_looped_equal_the_layers_run_k_times(tmp_path):
    """--core-layers 1:3 --loops 3: layer 0, then layers 1-2 three times, then layer 3."""
    model = build(tiny("llama"), seed=11)
    d = tmp_path / "model"
    model.save_pretrained(d, safe_serialization=True)
    tokens = tokens_for(model.config.vocab_size, seed=5)
    got = flowloop_logits(d, tokens, tmp_path, "f64", ("--core-layers", "1:3", "--loops", "3"))
    layers = list(model.model.layers)
    order = [layers[0]] + [layers[1], layers[2]] * 3 + [layers[3]]
    model.model.layers = torch.nn.ModuleList(order)  # the same modules, shared
    model.config.num_hidden_layers = len(order)
    assert rel(got, reference_logits(model, tokens, double=True)) < 1e-10
    # looped once, the split model is the checkpoint's own forward
    model.model.layers = torch.nn.ModuleList(layers)
    once = flowloop_logits(d, tokens, tmp_path, "f64", ("--core-layers", "1:3"))
    assert rel(once, reference_logits(model, tokens, double=True)) < 1e-10


def test_export_round_trip(tmp_path):
    """A flowloop llama model (a prelude, a looped core, a coda, GQA, biases) exported with
    --unroll 2 and loaded by transformers: the logits of two loops."""
    ckpt = tmp_path / "m.safetensors"
    run("init", "--arch", "llama", "--vocab", 61, "--context", 32, "--d-model", 24, "--n-head", 4, "--n-kv-head", 2,
        "--d-ff", 40, "--n-block", 2, "--n-prelude", 1, "--n-coda", 1, "--depth", 2, "--qkv-bias",
        "--untied-head", "--rope-theta", 500000, "--seed", 3, "--dtype", "f64", "-o", ckpt)
    out = tmp_path / "hf"
    run("export-hf", "-m", ckpt, "--out", out, "--unroll", 2, "--precision", "f64")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "qwen2" and cfg["num_hidden_layers"] == 1 + 2 * 2 + 1
    model = transformers.AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.float64).eval()
    tokens = tokens_for(61, seed=9)
    ours = flowloop_logits(ckpt, tokens, tmp_path, "f64", ("--loops", 2))
    with torch.no_grad(), double_reference():
        theirs = model(torch.tensor(tokens)).logits.numpy()
    assert rel(ours, theirs) < 1e-10
    # a looped model is not written as a plain stack unless told
    bad = subprocess.run([CLI, "export-hf", "-m", str(ckpt), "--out", str(tmp_path / "no")], capture_output=True,
                         text=True)
    assert bad.returncode != 0 and "give --unroll K" in bad.stderr


def test_refusals_name_the_key(tmp_path):
    model = build(tiny("llama"), seed=13)
    d = tmp_path / "model"
    model.save_pretrained(d, safe_serialization=True)
    tokens = tmp_path / "t.json"
    tokens.write_text(json.dumps({"tokens": [[1, 2, 3]]}))
    cfg = json.loads((d / "config.json").read_text())

    def refused(change, expect, files=None):
        c = dict(cfg)
        c.update(change)
        (d / "config.json").write_text(json.dumps(c))
        r = subprocess.run([CLI, "forward", "-m", str(d), "--tokens", str(tokens), "-o", str(tmp_path / "o.json")],
                           capture_output=True, text=True)
        (d / "config.json").write_text(json.dumps(cfg))
        assert r.returncode == 1 and expect in r.stderr, r.stderr

    refused({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, 'rope_scaling" of type "llama3"')
    refused({"model_type": "mistral"}, 'model_type "mistral" is not supported')
    refused({"hidden_act": "gelu"}, '"hidden_act" "gelu"')
    refused({"num_key_value_heads": 3}, "n_kv_head (3) must divide n_head (4)")
    refused({"hidden_size": 40}, "has shape")
    qcfg = dict(cfg, model_type="qwen2", use_sliding_window=True)
    refused(qcfg, "sliding-window attention")


def test_malformed_directories_are_refused(tmp_path):
    """A shard the index names but the directory lacks, a tensor the index names twice, a
    missing tensor: refused with the file and the name, and nothing loaded."""
    model = build(tiny("llama"), seed=17)
    d = tmp_path / "model"
    model.save_pretrained(d, safe_serialization=True, max_shard_size="40KB")
    tokens = tmp_path / "t.json"
    tokens.write_text(json.dumps({"tokens": [[1, 2, 3]]}))
    index = d / "model.safetensors.index.json"
    text = index.read_text()

    def refused(expect):
        r = subprocess.run([CLI, "forward", "-m", str(d), "--tokens", str(tokens), "-o", str(tmp_path / "o.json")],
                           capture_output=True, text=True)
        index.write_text(text)
        assert r.returncode == 1 and expect in r.stderr, r.stderr
        assert not (tmp_path / "o.json").exists()

    j = json.loads(text)
    shard = j["weight_map"]["model.norm.weight"]
    index.write_text(text.replace(shard, "model-99999-of-99999.safetensors"))
    refused("names shard 'model-99999-of-99999.safetensors', which the directory lacks")
    # the same tensor twice (a repeated JSON key)
    dup = text.replace('"weight_map": {', '"weight_map": {\n    "model.norm.weight": "' + shard + '",', 1)
    index.write_text(dup)
    refused("weight_map names tensor 'model.norm.weight' twice")
    del j["weight_map"]["model.layers.2.mlp.up_proj.weight"]
    index.write_text(json.dumps(j))
    refused("weight_map has no tensor 'model.layers.2.mlp.up_proj.weight'")
    (d / "config.json").write_text(json.dumps(dict(json.loads((d / "config.json").read_text()), num_hidden_layers=5)))
    refused("model.layers.4.")


def test_python_from_pretrained(tmp_path):
    """flowloop.Model.from_pretrained: numpy tokens in, transformers' logits out; with
    core_layers, the same model as the CLI's --core-layers."""
    flowloop = pytest.importorskip("flowloop", reason="the Python module (BUILD/python on PYTHONPATH)")
    model = build(tiny("qwen2", num_key_value_heads=1), seed=19)
    d = tmp_path / "model"
    model.save_pretrained(d, safe_serialization=True)
    tokens = tokens_for(model.config.vocab_size, seed=21)
    m = flowloop.Model.from_pretrained(str(d))
    out = m.forward(tokens)
    assert out["logits"].shape == (2, 12, 97)
    assert rel(out["logits"], reference_logits(model, tokens)) < 1e-5
    split = flowloop.Model.from_pretrained(str(d), core_layers="1:3")
    assert split.config["n_prelude"] == 1 and split.config["n_block"] == 2 and split.config["n_coda"] == 1
    looped = split.forward(tokens, loops=2)["logits"]
    cli = flowloop_logits(d, tokens, tmp_path, "f32", ("--core-layers", "1:3", "--loops", "2"))
    assert rel(looped, cli) < 1e-6
    with pytest.raises(Exception, match="not a directory with a config.json"):
        flowloop.Model.from_pretrained(str(tmp_path / "nowhere"))
