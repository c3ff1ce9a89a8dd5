"""flowloop's tokenizer against Hugging Face `tokenizers` on a multilingual corpus.

Byte-level BPE tokenizers in the layouts of the GPT-2, Llama-3, Qwen2 and SmolLM families are
trained here with `tokenizers` (PyPI, the tests' environment only), saved as tokenizer.json,
and both sides encode a corpus of more than 10,000 characters: many scripts, emoji (with
skin tones and joiners), digits, whitespace runs, contractions, decomposed accents, special
tokens. The ids must be equal, token for token.
"""

import json
import os
import random
import subprocess

import numpy as np
import pytest
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

CLI = os.environ.get("FLOWLOOP_CLI", "flowloop")

LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
          r"\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
         r"\s+(?!\S)|\s+")

SENTENCES = [
    "It's the model's loop, isn't it? We'll see; they've said you'd know, and I'm sure THEY'LL agree.",
    "Die Schleife läuft über größere Tiefen: Änderungen, Übergänge und Maße.",
    "Les équations différentielles ordinaires décrivent l'évolution — c'est élégant, n'est-ce pas ?",
    "Нейронные обыкновенные дифференциальные уравнения решаются адаптивными методами.",
    "Η συνεχής βαθύτητα είναι μια ωραία ιδέα για τα γλωσσικά μοντέλα.",
    "循环语言模型把同一个模块反复应用，这就是欧拉法。",
    "ループ言語モデルは同じブロックを繰り返し適用します。カタカナとひらがな。",
    "반복 언어 모델은 같은 블록을 여러 번 적용합니다.",
    "نماذج اللغة الحلقية تطبق نفس الكتلة مرارا وتكرارا.",
    "लूप्ड भाषा मॉडल एक ही ब्लॉक को बार-बार लागू करते हैं।",
    "Emoji: 🙂🚀🔥 👍🏽 👨‍👩‍👧‍👦 🏳️‍🌈 ✅❌ and flags 🇫🇷🇯🇵.",
    "Digits 0 12 345 6789 1234567890, π ≈ 3.14159265, 2026-12-07, ١٢٣ and ５６７.",
    "Whitespace   runs\t\ttabs\n\n\nnewlines    \n   and trailing spaces   ",
    "Code: for (int i = 0; i < n; ++i) { y[i] += a * x[i]; }  // axpy",
    "Decomposed: cafe\u0301, nai\u0308ve, A\u030angstro\u0308m; composed: café, naïve, Ångström.",
    "Special <|endoftext|> tokens <|im_start|>inside<|im_end|> the text.",
    "Punctuation!!! ... ??? --- ((nested)) [brackets] {braces} \"quotes\" 'single' `ticks`",
    "Mixed123abc, ABC's, x_1^2 + y_2^2 = z^2, e-mail: someone@example.org, URL https://a.b/c?d=e",
]


def corpus(seed, n_chars):
    rng = random.Random(seed)
    out = []
    while sum(map(len, out)) < n_chars:
        s = rng.choice(SENTENCES)
        if rng.random() < 0.3:
            s = s.upper() if rng.random() < 0.5 else s.lower()
        out.append(s + rng.choice([" ", "  ", "\n", "\n\n", "\t", " \n "]))
    return "".join(out)


SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def make(kind):
    if kind == "llama3":
        tok = Tokenizer(models.BPE(ignore_merges=True))
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    elif kind == "qwen2":
        tok = Tokenizer(models.BPE())
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN2), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    elif kind == "smollm":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    else:  # gpt2, and gpt2 with a prefix space
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=kind == "gpt2-prefix")
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1200, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([corpus(1, 20000)], trainer=trainer)
    return tok


def flowloop_ids(tok_path, text, tmp_path):
    f = tmp_path / "text.txt"
    f.write_bytes(text.encode("utf-8"))
    out = tmp_path / "ids.json"
    r = subprocess.run([CLI, "tokenize", "--tokenizer", str(tok_path), "--text-file", str(f), "-o", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return json.loads(out.read_text())["tokens"][0]


@pytest.mark.parametrize("kind", ["gpt2", "gpt2-prefix", "llama3", "qwen2", "smollm"])
def test_ids_equal_tokenizers(kind, tmp_path):
    tok = make(kind)
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    text = corpus(2, 12000)  # another draw than the training text
    assert len(text) >= 10000
    want = tok.encode(text, add_special_tokens=False).ids
    got = flowloop_ids(path, text, tmp_path)
    assert len(want) > 1000
    if got != want:
        i = next(k for k, (a, b) in enumerate(zip(got, want)) if a != b) if len(got) == len(want) or any(
            a != b for a, b in zip(got, want)) else min(len(got), len(want))
        pytest.fail(f"first difference at token {i}: flowloop {got[i:i + 8]} tokenizers {want[i:i + 8]} "
                    f"({tok.decode(want[max(0, i - 4):i + 8])!r})")
    # every sentence alone too (a piece at the very start or end of a text)
    for s in SENTENCES:
        assert flowloop_ids(path, s, tmp_path) == tok.encode(s, add_special_tokens=False).ids, s


def test_forward_text_uses_the_models_tokenizer(tmp_path):
    """forward --text on a Hugging Face directory: the ids of its tokenizer.json, the same logits."""
    import transformers
    import torch
    tok = make("llama3")
    cfg = transformers.LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, intermediate_size=48,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=256)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    d = tmp_path / "model"
    model.save_pretrained(d, safe_serialization=True)
    tok.save(str(d / "tokenizer.json"))
    text = "It's 2026: loops, ODEs and 🙂 emoji."
    ids = tok.encode(text, add_special_tokens=False).ids
    out = tmp_path / "o.json"
    r = subprocess.run([CLI, "forward", "-m", str(d), "--text", text, "-o", str(out), "--device", "cpu"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    got = np.array(json.loads(out.read_text())["logits"])
    with torch.no_grad():
        want = model(torch.tensor([ids]), use_cache=False).logits.numpy()
    assert got.shape == want.shape
    assert np.max(np.abs(got - want)) / np.max(np.abs(want)) < 1e-5


def test_refusals(tmp_path):
    tok = make("gpt2")
    spec = json.loads(tok.to_str())
    bad = tmp_path / "bad.json"

    def refused(change, expect):
        s = json.loads(json.dumps(spec))
        change(s)
        bad.write_text(json.dumps(s))
        r = subprocess.run([CLI, "tokenize", "--tokenizer", str(bad), "--text", "hi"], capture_output=True, text=True)
        assert r.returncode == 1 and expect in r.stderr, r.stderr

    refused(lambda s: s["model"].update(type="WordPiece"), 'model type "WordPiece"')
    good = tmp_path / "good.json"
    good.write_text(json.dumps(spec))
    raw = tmp_path / "raw.txt"
    raw.write_bytes(b"abc \xff\xfe def")
    r = subprocess.run([CLI, "tokenize", "--tokenizer", str(good), "--text-file", str(raw)], capture_output=True,
                       text=True)
    assert r.returncode == 1 and "not valid UTF-8 at byte 4" in r.stderr, r.stderr
    refused(lambda s: s.update(normalizer={"type": "Lowercase"}), 'normalizer "Lowercase"')
    refused(lambda s: s.update(pre_tokenizer={"type": "Metaspace", "replacement": "_"}), 'pre-tokenizer "Metaspace"')
    refused(lambda s: s["model"].update(byte_fallback=True), '"byte_fallback" true')
    refused(lambda s: s.update(pre_tokenizer={"type": "Split", "pattern": {"Regex": "(unclosed"},
                                              "behavior": "Isolated", "invert": False}), "does not compile")


def test_studies_on_a_hugging_face_model(tmp_path):
    """compare, eval and trajectory on a Hugging Face directory with --core-layers, reading a
    text in the model's own tokens: the loop-1 loss of compare equals eval's, and the regimes
    run."""
    import transformers
    import torch
    tok = make("qwen2")
    cfg = transformers.Qwen2Config(vocab_size=tok.get_vocab_size() + 16, hidden_size=32, intermediate_size=48,
                                   num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=64)  # (a vocabulary padded past the tokenizer's)
    torch.manual_seed(1)
    model = transformers.Qwen2ForCausalLM(cfg).eval()
    d = tmp_path / "model"
    model.save_pretrained(d, safe_serialization=True)
    tok.save(str(d / "tokenizer.json"))
    text = tmp_path / "text.txt"
    text.write_text(corpus(3, 20000))
    common = ["-m", str(d), "--core-layers", "1:3", "--text", str(text), "--context", "24"]
    out = tmp_path / "cmp"
    r = subprocess.run([CLI, "compare", *common, "--regimes", "loop:1,loop:2,rk4:2,dopri5:0.01", "--batches", "1",
                        "--batch", "4", "--out", str(out), "--device", "cpu"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    rows = {}
    import csv
    with open(out / "compare.csv") as f:
        for row in csv.DictReader(f):
            rows[row["regime"]] = row
    assert set(rows) == {"loop:1", "loop:2", "rk4:2", "dopri5:0.01"}
    r = subprocess.run([CLI, "eval", *common, "--loops", "1", "--batches", "1", "--batch", "4", "--json", "--device",
                        "cpu"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    ev = json.loads(r.stdout.strip().splitlines()[-1])
    assert abs(float(rows["loop:1"]["loss"]) - ev["loss"]) <= 1e-6 * abs(ev["loss"])
    r = subprocess.run([CLI, "trajectory", *common, "--solver", "rk4", "--solver-steps", "2", "--times", "3",
                        "--batches", "1", "--batch", "2", "--out", str(tmp_path / "traj"), "--device", "cpu"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    # flow matching over the Hugging Face teacher's latent paths: record, train, evaluate
    data = tmp_path / "fm"
    r = subprocess.run([CLI, "flow-match", "record", *common, "--loops", "2", "--examples", "8", "--test-examples", "4",
                        "--batch", "4", "--shard-size", "4", "--out", str(data), "--device", "cpu"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    man = json.loads((data / "manifest.json").read_text())
    assert man["K"] == 2 and man["data"]["tokenizer"].endswith("model")
    r = subprocess.run([CLI, "flow-match", "train", "--data", str(data), "--steps", "3", "--batch", "4", "--eval-every",
                        "3", "--checkpoint-every", "3", "--out", str(tmp_path / "student"), "--device", "cpu"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([CLI, "flow-match", "eval", "-m", str(tmp_path / "student" / "model.safetensors"), "--data",
                        str(data), "--samplers", "euler:2", "--examples", "4", "--batch", "4", "--json", "--device",
                        "cpu"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    # a rerun of the record resumes (the same teacher checkpoint, the same hash)
    r = subprocess.run([CLI, "flow-match", "record", *common, "--loops", "2", "--examples", "8", "--test-examples", "4",
                        "--batch", "4", "--shard-size", "4", "--out", str(data), "--device", "cpu"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    # without a text, a Hugging Face model is refused by name
    r = subprocess.run([CLI, "compare", "-m", str(d), "--out", str(tmp_path / "no")], capture_output=True, text=True)
    assert r.returncode == 1 and "give --text FILE" in r.stderr
