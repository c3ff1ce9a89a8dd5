"""flowloop: looped and continuous-depth transformers, from Python.

The C++ library's models, solvers, training and studies (the `_flowloop` extension):

    import numpy as np, flowloop
    m = flowloop.Model.init(vocab=32, context=16, d_model=32, n_head=4, depth=4, seed=0)
    out = m.forward(np.array([[1, 2, 3]]), solver="dopri5", rtol=1e-3, atol=1e-4)
    out["logits"].shape, out["nfe"], out["seq_nfe"]
    sol = flowloop.solve(lambda t, y: -y, np.ones(3), 0.0, 1.0, rtol=1e-8, atol=1e-10)

Flow matching over a trained model's latent paths:

    rec = flowloop.flow_match_record("teacher/model.safetensors", "rec", examples=1024)
    student = flowloop.flow_match_train(data="rec", matcher="trajectory", steps=500, out="student")
    rows = flowloop.flow_match_eval(student["model"], "rec", samplers="euler:1,rk4:2,dopri5:0.001")

Errors in arguments raise flowloop.Error (a ValueError) naming the argument.
"""
from ._flowloop import (Error, Model, compare, evaluate, flow_match_eval, flow_match_record, flow_match_train, solve,
                        train, trajectory)

__all__ = ["Error", "Model", "compare", "evaluate", "flow_match_eval", "flow_match_record", "flow_match_train",
           "solve", "train", "trajectory"]
