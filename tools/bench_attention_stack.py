"""SmolLM2's 30 attentions at one new token over a float cache of P slots, in one graph, in each
form onnxruntime offers: what attention over the cache costs a decode step by itself.

    python tools/bench_attention_stack.py [--past 256] [--threads 2] [--rounds 10]

Layer i reads its own cache inputs pk_i, pv_i [1, 3, P, 64] and returns present_k_i, present_v_i;
its query is the previous layer's output [1, 1, 9·64], its new key and value the first 3·64 of it
(stand-ins for the projections, which this leaves out). Forms:
  grouped   what passes/decode_attention.py writes: K' = Concat(pk, k), V' = Concat(pv, v), the
            query heads grouped as [1, kv, 9/kv, 64] against K'ᵀ, Softmax(c·S + bias), P·V'
  attn23    ONNX Attention (opset 23) with past_key / past_value, q_num_heads 9, kv_num_heads 3
  gqa       com.microsoft GroupQueryAttention (seqlens_k = P, total_sequence_length = P + 1)
All three give the same output (checked: max difference printed). Median ms per run of the
whole stack, interleaved rounds, spinning off.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from pathlib import Path

import numpy as np
from onnx import TensorProto as T, helper as H, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import machine  # noqa: E402

from graphpass.graph.runtime import make_session  # noqa: E402

HEADS, KV, D, LAYERS = 9, 3, 64, 30
F = T.FLOAT


def _c(name, a):
    return numpy_helper.from_array(np.asarray(a), name)


def _layer(kind: str, i: int, x: str) -> list:
    pk, pv, k, y = f"pk{i}", f"pv{i}", f"k{i}", f"y{i}"
    pres = [f"present_k{i}", f"present_v{i}"]
    n = [H.make_node("Slice", [x, "s0", "kvw", "last"], [k])]
    if kind == "grouped":
        return n + [H.make_node("Reshape", [k, "kv_shape"], [f"kr{i}"]),
                    H.make_node("Concat", [pk, f"kr{i}"], [pres[0]], axis=2),
                    H.make_node("Concat", [pv, f"kr{i}"], [pres[1]], axis=2),
                    H.make_node("Reshape", [x, "grouped_q"], [f"qg{i}"]),
                    H.make_node("Transpose", [pres[0]], [f"kt{i}"], perm=[0, 1, 3, 2]),
                    H.make_node("MatMul", [f"qg{i}", f"kt{i}"], [f"s0{i}"]),
                    H.make_node("Mul", [f"s0{i}", "scale"], [f"s1{i}"]),
                    H.make_node("Add", [f"s1{i}", "bias"], [f"s2{i}"]),
                    H.make_node("Softmax", [f"s2{i}"], [f"p{i}"], axis=-1),
                    H.make_node("MatMul", [f"p{i}", pres[1]], [f"o{i}"]),
                    H.make_node("Reshape", [f"o{i}", "row"], [y])]
    if kind == "attn23":
        return n + [H.make_node("Attention", [x, k, k, "bias", pk, pv], [y] + pres, q_num_heads=HEADS,
                                kv_num_heads=KV, scale=1 / np.sqrt(D))]
    return n + [H.make_node("GroupQueryAttention", [x, k, k, pk, pv, "seqlens", "total"], [y] + pres,
                            domain="com.microsoft", num_heads=HEADS, kv_num_heads=KV, scale=1 / np.sqrt(D))]


def build(kind: str):
    inits = [_c("s0", np.array([0], np.int64)), _c("kvw", np.array([KV * D], np.int64)),
             _c("last", np.array([-1], np.int64)), _c("kv_shape", np.array([1, KV, 1, D], np.int64)),
             _c("grouped_q", np.array([1, KV, HEADS // KV, D], np.int64)), _c("row", np.array([1, 1, -1], np.int64)),
             _c("scale", np.array(1 / np.sqrt(D), np.float32))]
    ins = [H.make_tensor_value_info("x", F, [1, 1, HEADS * D]), H.make_tensor_value_info("bias", F, [1, 1, 1, "T"])]
    if kind == "gqa":
        ins += [H.make_tensor_value_info("seqlens", T.INT32, [1]), H.make_tensor_value_info("total", T.INT32, [])]
    nodes, outs, x = [], [], "x"
    for i in range(LAYERS):
        ins += [H.make_tensor_value_info(f"p{t}{i}", F, [1, KV, "P", D]) for t in "kv"]
        outs += [H.make_tensor_value_info(f"present_{t}{i}", F, None) for t in "kv"]
        nodes += _layer(kind, i, x)
        x = f"y{i}"
    outs.insert(0, H.make_tensor_value_info(x, F, None))
    opsets = [H.make_opsetid("", 23)] + ([H.make_opsetid("com.microsoft", 1)] if kind == "gqa" else [])
    m = H.make_model(H.make_graph(nodes, kind, ins, outs, inits), opset_imports=opsets)
    m.ir_version = 10
    return m


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--past", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=10)
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    kinds = ["grouped", "attn23", "gqa"]
    feeds = {"x": rng.standard_normal((1, 1, HEADS * D)).astype(np.float32),
             "bias": np.zeros((1, 1, 1, a.past + 1), np.float32)}
    for i in range(LAYERS):
        for t in "kv":
            feeds[f"p{t}{i}"] = rng.standard_normal((1, KV, a.past, D)).astype(np.float32)
    extra = {"gqa": {"seqlens": np.array([a.past], np.int32), "total": np.array(a.past + 1, np.int32)}}
    feed = {k: {**feeds, **extra.get(k, {})} for k in kinds}
    sess = {k: make_session(build(k), a.threads) for k in kinds}
    first = {k: sess[k].run(None, feed[k])[0] for k in kinds}
    times, load0 = {k: [] for k in kinds}, os.getloadavg()[0]
    for r in range(a.rounds):
        for k in (kinds if r % 2 == 0 else kinds[::-1]):
            for _ in range(30):
                t0 = time.perf_counter()
                sess[k].run(None, feed[k])
                times[k].append(time.perf_counter() - t0)
    print(f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {machine()}, {a.threads} threads, "
          f"spinning off, {LAYERS} layers, past {a.past}, load {load0:.2f} -> {os.getloadavg()[0]:.2f}")
    for k in kinds:
        print(f"  {k:<8} {np.median(times[k]) * 1e3:7.3f} ms (p10 {np.percentile(times[k], 10) * 1e3:.3f})  "
              f"max |out - grouped| {float(np.abs(first[k] - first['grouped']).max()):.1e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
