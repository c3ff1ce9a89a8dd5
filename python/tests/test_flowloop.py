"""The Python module against the library and the CLI: numpy in and out with errors that
name the argument, Hairer's DOPRI5 step counts through a Python right-hand side, a model
trained from Python equal to the CLI's bits, a flow student recorded, trained and evaluated
from Python equal to the CLI's, the GIL released during long work."""
import json
import os
import struct
import subprocess
import threading
import time

import numpy as np
import pytest

import flowloop

CLI = os.environ.get("FLOWLOOP_CLI")


def tiny_model(**kw):
    args = dict(vocab=16, context=8, d_model=16, n_head=2, depth=3, seed=4)
    args.update(kw)
    return flowloop.Model.init(**args)


def test_forward_numpy_in_and_out():
    m = tiny_model()
    tokens = np.array([[1, 2, 3, 4], [5, 6, 7, 8], [0, 15, 3, 3]], dtype=np.int64)
    loop = m.forward(tokens)  # the trained depth: loop 3
    assert loop["logits"].shape == (3, 4, 16) and loop["logits"].dtype == np.float32
    assert loop["nfe"] == 3 and loop["depth"] == "loop 3"
    assert np.isfinite(loop["logits"]).all()
    # loop K is Euler with K steps on [0, K], bit for bit (also through Python)
    euler = m.forward(tokens.astype(np.int32), solver="euler", steps=3)
    assert np.array_equal(euler["logits"], loop["logits"])
    ode = m.forward(tokens, solver="dopri5", rtol=1e-4, atol=1e-6)
    assert ode["status"] == "success" and ode["nfe"] > 0
    assert ode["seq_nfe"].shape == (3,) and ode["seq_nfe"].dtype == np.int64
    assert ode["nfe"] == ode["seq_nfe"].max()
    assert m.config["d_model"] == 16 and m.params.dtype == np.float32


def test_bad_arguments_name_themselves():
    m = tiny_model()
    with pytest.raises(ValueError, match="'tokens' must be a 2-D"):
        m.forward(np.array([1, 2, 3]))
    with pytest.raises(flowloop.Error, match="'tokens' must hold integers"):
        m.forward(np.array([[1.0, 2.0]]))
    with pytest.raises(flowloop.Error, match="tokens"):
        m.forward(np.array([[1, 99]]))  # outside the vocabulary of 16
    with pytest.raises(flowloop.Error, match="--rtol"):
        m.forward(np.array([[1, 2]]), solver="rk4", steps=2, rtol=1e-3)
    with pytest.raises(ValueError, match="'y0' must be 1-D"):
        flowloop.solve(lambda t, y: y, np.zeros((1, 2, 3)), 0.0, 1.0)
    with pytest.raises(ValueError, match="'y0' must hold floats"):
        flowloop.solve(lambda t, y: y, np.array(["a"]), 0.0, 1.0)
    with pytest.raises(ValueError, match=r"returned shape \(3\), not \(2\)"):
        flowloop.solve(lambda t, y: np.zeros(3), np.zeros(2), 0.0, 1.0)
    with pytest.raises(ValueError, match="controller"):
        flowloop.solve(lambda t, y: y, np.zeros(2), 0.0, 1.0, controller="pid")
    with pytest.raises(ValueError, match="unknown_key"):
        flowloop.train(task="phop", loops=2, unknown_key=1, out="/tmp/never")


def arenstorf(t, y):
    mu = 0.012277471
    mup = 1 - mu
    r1 = ((y[0] + mu) * (y[0] + mu) + y[1] * y[1]) ** 1.5
    r2 = ((y[0] - mup) * (y[0] - mup) + y[1] * y[1]) ** 1.5
    return np.array([y[2], y[3], y[0] + 2 * y[3] - mup * (y[0] + mu) / r1 - mu * (y[0] - mup) / r2,
                     y[1] - 2 * y[2] - mup * y[1] / r1 - mu * y[1] / r2])


def vdp(t, y):
    return np.array([y[1], (1 - y[0] * y[0]) * y[1] - y[0]])


# Hairer's dopri5.f (2005), rtol = atol = tol: nfcn, nstep, naccpt, nrejct
HAIRER = [
    (arenstorf, [0.994, 0.0, 0.0, -2.00158510637908252240537862224], 17.0652165601579625588917206249, 1e-4,
     (494, 82, 64, 18)),
    (arenstorf, [0.994, 0.0, 0.0, -2.00158510637908252240537862224], 17.0652165601579625588917206249, 1e-7,
     (1442, 240, 216, 22)),
    (vdp, [2.0, 0.0], 20.0, 1e-4, (482, 80, 62, 18)),
    (vdp, [2.0, 0.0], 20.0, 1e-7, (1520, 253, 225, 28)),
]


@pytest.mark.parametrize("f,y0,t1,tol,counts", HAIRER)
def test_hairer_step_counts_through_python(f, y0, t1, tol, counts):
    r = flowloop.solve(f, np.array(y0), 0.0, t1, rtol=tol, atol=tol)
    assert r["status"] == "success"
    assert (r["nfe"], r["steps"], r["accepted"], r["rejected"]) == counts
    # rows are independent solves with their own steps, called one at a time or vectorized
    rows = np.array([y0, y0])
    batched = flowloop.solve(f, rows, 0.0, t1, rtol=tol, atol=tol)
    assert list(batched["seq_nfe"]) == [counts[0]] * 2
    assert np.array_equal(batched["y"][0], r["y"])
    vec = flowloop.solve(lambda t, Y: np.stack([f(ti, yi) for ti, yi in zip(t, Y)]), rows, 0.0, t1,
                         rtol=tol, atol=tol, vectorized=True)
    assert np.array_equal(vec["y"], batched["y"])


def tensors(path):
    raw = open(path, "rb").read()
    (n,) = struct.unpack("<Q", raw[:8])
    head = json.loads(raw[8:8 + n])
    data = raw[8 + n:]
    return {k: data[v["data_offsets"][0]:v["data_offsets"][1]] for k, v in head.items() if k != "__metadata__"}


@pytest.mark.skipif(not CLI, reason="FLOWLOOP_CLI (the flowloop command) not set")
def test_trained_from_python_equals_the_cli(tmp_path):
    options = dict(task="phop", task_n=8, task_hops=2, d_model=16, n_head=2, loops=2, steps=8, batch=8, warmup=2,
                   eval_every=4, eval_batches=1, checkpoint_every=4, seed=5)
    py_out = flowloop.train(out=str(tmp_path / "py"), **options)
    config = tmp_path / "config.json"
    config.write_text(json.dumps(dict(options, out=str(tmp_path / "cli"))))
    subprocess.run([CLI, "train", "--config", str(config), "--device", "cpu"], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    a, b = tensors(py_out["model"]), tensors(str(tmp_path / "cli" / "model.safetensors"))
    assert a.keys() == b.keys() and all(a[k] == b[k] for k in a)
    la = [json.loads(l)["loss"] for l in open(py_out["metrics"])]
    lb = [json.loads(l)["loss"] for l in open(tmp_path / "cli" / "metrics.jsonl")]
    assert la == lb and len(la) == 8
    m = flowloop.Model.load(py_out["model"])
    ev = flowloop.evaluate(m, task="phop", task_n=8, task_hops=2, batches=2, batch=8)
    assert 0 <= ev["accuracy"] <= 1 and ev["status"] == "ok" and ev["nfe"] == 2
    rows = flowloop.compare(m, task="phop", task_n=8, task_hops=2, regimes="loop:1,loop:2,rk4:2,dopri5:0.01",
                            batches=1, batch=8)
    assert rows["regime"] == ["loop:1", "loop:2", "rk4:2", "dopri5:0.01"]
    assert rows["accuracy"].shape == (4,) and rows["pareto"].dtype == bool and rows["pareto"].any()
    assert rows["nfe_mean"][0] == 1 and rows["nfe_mean"][1] == 2
    # the lens: loop 2 gives depths 0, 1, 2, its last state the one eval reads out
    lens = flowloop.trajectory(m, task="phop", task_n=8, task_hops=2, batch=8)
    assert list(lens["times"]) == [0.0, 1.0, 2.0] and lens["states"].shape[:2] == (3, 8)
    assert lens["dist_to_final"][-1] == 0 and lens["loss"][-1] == pytest.approx(lens["final"]["loss"], rel=1e-6)
    ode = flowloop.trajectory(m, task="phop", task_n=8, task_hops=2, batch=8, solver="dopri5", times=5)
    assert ode["source"] == "solve" and len(ode["times"]) == 5 and len(ode["step_t"]) > 0


def test_long_work_releases_the_gil():
    m = tiny_model(context=64, d_model=64, n_head=4)
    tokens = np.random.default_rng(0).integers(0, 16, size=(16, 64))
    ticks = []
    stop = threading.Event()

    def tick():
        while not stop.is_set():
            ticks.append(time.perf_counter())
            time.sleep(0.001)

    thread = threading.Thread(target=tick)
    thread.start()
    time.sleep(0.01)
    start, before = time.perf_counter(), len(ticks)
    while time.perf_counter() - start < 0.5:
        m.forward(tokens, solver="dopri5", rtol=1e-7, atol=1e-9)
    during = len(ticks) - before
    stop.set()
    thread.join()
    # the other thread kept running while the solves held no GIL (about 1 tick a ms)
    assert during > 50, during


@pytest.mark.skipif(not CLI, reason="FLOWLOOP_CLI (the flowloop command) not set")
def test_flow_matching_from_python_equals_the_cli(tmp_path):
    teacher = flowloop.train(out=str(tmp_path / "teacher"), task="phop", task_n=8, task_hops=2, d_model=16,
                             n_head=2, loops=3, steps=6, batch=8, warmup=2, eval_every=3, eval_batches=1,
                             checkpoint_every=3, seed=2)
    rec = flowloop.flow_match_record(teacher["model"], str(tmp_path / "rec"), examples=32, test_examples=16,
                                     batch=16, shard_size=16)
    assert rec["K"] == 3 and list(rec["times"]) == [0.0, 1.0, 2.0, 3.0]
    assert rec["train_examples"] == 32 and rec["test_examples"] == 16 and rec["C"] == 16
    options = dict(data=rec["data"], matcher="trajectory", steps=6, batch=8, warmup=2, eval_every=3, eval_batches=1,
                   checkpoint_every=3, time_freq=16, seed=1)
    py_out = flowloop.flow_match_train(out=str(tmp_path / "py"), **options)
    config = tmp_path / "fm.json"
    config.write_text(json.dumps(dict(options, out=str(tmp_path / "cli"))))
    subprocess.run([CLI, "flow-match", "train", "--config", str(config), "--device", "cpu"], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    a, b = tensors(py_out["model"]), tensors(str(tmp_path / "cli" / "model.safetensors"))
    assert a.keys() == b.keys() and all(a[k] == b[k] for k in a)
    la = [json.loads(l)["loss"] for l in open(py_out["metrics"])]
    lb = [json.loads(l)["loss"] for l in open(tmp_path / "cli" / "metrics.jsonl")]
    assert la == lb and len(la) == 6
    samplers = "euler:1,rk4:2,dopri5:0.01"
    rows = flowloop.flow_match_eval(py_out["model"], rec["data"], samplers=samplers, batch=8)
    cli = subprocess.run([CLI, "flow-match", "eval", "-m", py_out["model"], "--data", rec["data"], "--samplers",
                          samplers, "--batch", "8", "--json", "--device", "cpu"], check=True, capture_output=True,
                         text=True).stdout.split("\n")
    cli = [json.loads(l) for l in cli if l.strip()]
    assert rows["sampler"] == [r["sampler"] for r in cli] and rows["sampler"][:3] == samplers.split(",")
    assert any(s.startswith("teacher") for s in rows["sampler"])  # the truncated teacher's rows
    for key in ("nfe", "rel_l2", "kl", "accuracy", "straightness", "frechet"):
        assert rows[key].dtype == np.float64 and np.isfinite(rows[key]).all(), key
        assert list(rows[key]) == pytest.approx([r[key] for r in cli], rel=1e-12, abs=0), key
    assert rows["examples"][0] == 16 and rows["status"] == [r["status"] for r in cli]
    only = flowloop.flow_match_eval(py_out["model"], rec["data"], samplers="rk4:2", teacher=False, batch=8)
    assert only["sampler"] == ["rk4:2"] and only["rel_l2"][0] == rows["rel_l2"][1]
    with pytest.raises(ValueError, match="'shortcut:x' is not shortcut:N"):
        flowloop.flow_match_eval(py_out["model"], rec["data"], samplers="shortcut:x")
    with pytest.raises(ValueError, match="needs --solver"):  # a depth key alone makes a depth, as the CLI's flags
        flowloop.flow_match_record(teacher["model"], str(tmp_path / "rec3"), steps=2)
    with pytest.raises(ValueError, match="not on task 'modarith'"):
        flowloop.flow_match_record(teacher["model"], str(tmp_path / "rec2"), task="modarith")
    with pytest.raises(ValueError, match="unknown_key"):
        flowloop.flow_match_train(out=str(tmp_path / "bad"), unknown_key=1, **options)
