"""Node forms of the outlier split on one linear layer Y = X·W (576 -> 1536), timed on onnxruntime CPU.

Forms (all exact in float; int8 where noted):
  fp32        MatMul(X, W)
  token       the token W8A8 form (qforms.emit_token) with no outlier column
  mask        token(X ⊙ m)·int8(W ⊙ m) + MatMul(Gather(X, O), W[O]) -> Add   (what passes/outlier emits)
  mask_where  the same with Where(O, 0, X) for X ⊙ m
  mask_gemm   the same with Gemm(X[O], W[O], C = int8 part) instead of MatMul + Add
  gather      token(Gather(X, R))·int8(W[R]) + the float part (sliced weights, no mask)
Sessions: 2 threads, spinning off; forms timed round-robin in short blocks; median per form.
Used by `tools/bench_outlier.py --forms`.
"""
from __future__ import annotations

import time

import numpy as np
import onnx
from onnx import TensorProto as TP
from onnx import helper as h
from onnx import numpy_helper as nh

from graphpass.graph.runtime import make_session
from graphpass.passes.qforms import quantize_weight

K, N = 576, 1536
FORMS = ("fp32", "token", "mask", "mask_where", "mask_gemm", "gather")


def _c(name: str, v) -> onnx.TensorProto:
    return nh.from_array(np.asarray(v), name)


def _token(x: str, w: np.ndarray, y: str, nodes: list, inits: list) -> None:
    q, s = quantize_weight(w)
    inits += [_c("Wq", q), _c("Ws", s), _c("ax", np.array([-1], np.int64)), _c("eps", np.float32(1e-30)),
              _c("i127", np.float32(1 / 127)), _c("one", np.float32(1)), _c("z", np.uint8(128))]
    nodes += [h.make_node("Abs", [x], ["a"]), h.make_node("ReduceMax", ["a", "ax"], ["r"], keepdims=1),
              h.make_node("Max", ["r", "eps"], ["r2"]), h.make_node("Mul", ["r2", "i127"], ["s"]),
              h.make_node("Div", [x, "s"], ["xs"]), h.make_node("QuantizeLinear", ["xs", "one", "z"], ["xq"]),
              h.make_node("MatMulIntegerToFloat", ["xq", "Wq", "one", "Ws", "z"], ["yp"], domain="com.microsoft"),
              h.make_node("Mul", ["yp", "s"], [y])]


def build(form: str, w: np.ndarray, o: np.ndarray) -> onnx.ModelProto:
    nodes, inits = [], []
    r = np.setdiff1d(np.arange(K), o)
    wm = w.copy()
    wm[o] = 0
    if form == "fp32":
        inits.append(_c("W", w))
        nodes.append(h.make_node("MatMul", ["X", "W"], ["Y"]))
    elif form == "token":
        _token("X", w, "Y", nodes, inits)
    else:
        if form == "gather":
            inits.append(_c("R", r))
            nodes.append(h.make_node("Gather", ["X", "R"], ["Xr"], axis=-1))
            _token("Xr", w[r], "Yi", nodes, inits)
        else:
            if form == "mask_where":
                inits += [_c("bm", np.isin(np.arange(K), o)), _c("zero", np.float32(0))]
                nodes.append(h.make_node("Where", ["bm", "zero", "X"], ["Xm"]))
            else:
                inits.append(_c("mask", (~np.isin(np.arange(K), o)).astype(np.float32)))
                nodes.append(h.make_node("Mul", ["X", "mask"], ["Xm"]))
            _token("Xm", wm, "Yi", nodes, inits)
        inits += [_c("O", o), _c("Wo", w[o])]
        nodes.append(h.make_node("Gather", ["X", "O"], ["Xo"], axis=-1))
        if form == "mask_gemm":
            inits += [_c("s2", np.array([-1, o.size], np.int64)), _c("sy", np.array([-1, N], np.int64)),
                      _c("s3", np.array([1, -1, N], np.int64))]
            nodes += [h.make_node("Reshape", ["Xo", "s2"], ["Xo2"]), h.make_node("Reshape", ["Yi", "sy"], ["Yi2"]),
                      h.make_node("Gemm", ["Xo2", "Wo", "Yi2"], ["Y2"]), h.make_node("Reshape", ["Y2", "s3"], ["Y"])]
        else:
            nodes += [h.make_node("MatMul", ["Xo", "Wo"], ["Yf"]), h.make_node("Add", ["Yi", "Yf"], ["Y"])]
    g = h.make_graph(nodes, form, [h.make_tensor_value_info("X", TP.FLOAT, [1, "S", K])],
                     [h.make_tensor_value_info("Y", TP.FLOAT, [1, "S", N])], inits)
    return h.make_model(g, opset_imports=[h.make_opsetid("", 18), h.make_opsetid("com.microsoft", 1)])


def time_forms(n_outliers: int = 6, rows: int = 512, rounds: int = 6, seed: int = 0) -> dict[str, float]:
    """Median ms per form at [1, rows, 576]; also checks every split form against X·W."""
    rng = np.random.default_rng(seed)
    o = np.sort(rng.choice(K, n_outliers, replace=False)).astype(np.int64)
    w = rng.standard_normal((K, N)).astype(np.float32)
    x = rng.standard_normal((1, rows, K)).astype(np.float32)
    x[..., o] *= 30
    sess = {f: make_session(build(f, w, o), 2) for f in FORMS}
    ref = x @ w
    outs = {f: sess[f].run(None, {"X": x})[0] for f in FORMS}
    split = [f for f in FORMS if f not in ("fp32", "token")]
    errs = [float(np.abs(outs[f] - ref).max() / np.abs(ref).max()) for f in split]
    assert max(errs) < 0.1 and np.allclose([outs[f] for f in split], outs["mask"], rtol=1e-4, atol=1e-3)
    per = max(1, int(0.05 / max(1e-5, _once(sess["fp32"], x))))
    t = {f: [] for f in FORMS}
    for _ in range(rounds):
        for f in FORMS:
            for _ in range(per):
                a = time.perf_counter()
                sess[f].run(None, {"X": x})
                t[f].append(time.perf_counter() - a)
            time.sleep(0.02)
    return {f: 1e3 * float(np.median(v)) for f, v in t.items()}


def _once(s, x) -> float:
    a = time.perf_counter()
    s.run(None, {"X": x})
    return time.perf_counter() - a


def print_forms(n_outliers: int = 6) -> None:
    import os

    for rows in (512, 1):
        ms = time_forms(n_outliers, rows)
        print(f"[1, {rows}, {K}] x [{K}, {N}], |O| = {n_outliers}, load {os.getloadavg()[0]:.2f}: "
              + ", ".join(f"{f} {v:.3f} ms ({v / ms['token']:.2f}x token)" for f, v in ms.items()))
