"""One decode step of one attention layer with a cache of P slots, four ways, timed interleaved
on onnxruntime CPU (2 threads, no spinning): which kernel path suits an int8 KV cache?

  float     Concat(past f32, k) -> repeat kv -> MatMul(q, K^T) -> Softmax -> MatMul(p, V)
  dequant   Concat(past i8, k8) -> Cast -> Mul(s) -> (float attention as above)
  folded    Concat(past i8, k8) -> Cast -> float attention with q·diag(s_k) and out·diag(s_v)
  mixed     Concat(past i8, k8) -> repeat kv in int8 -> MatMulInteger(DynamicQuantizeLinear(q·diag(s_k))
            u8, K^T s8) for the scores; P·Cast(V) in float, out·diag(s_v)
  integer   as mixed, and P·V as MatMulInteger(QuantizeLinear(p, 1/255) u8, V s8) (p loses precision:
            a probability under 1/510 becomes 0)
  gqa/gqa8  com.microsoft GroupQueryAttention with a float cache / its own int8 per-channel cache
  grouped / grouped8   no repeat kv: q as [b, kv, rep·s, d] reads the [b, kv, T, d] cache directly
            (MatMul broadcasts over kv), scores and output reshaped back to h heads; float cache /
            int8 cache folded as `folded` (Cast, q·diag(s_k), out·diag(s_v))

    python tools/bench_kv_attention.py [--past 2048] [--seconds 10]
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np
import onnx
from onnx import TensorProto as T, helper as H

from graphpass.graph.runtime import make_session

h, kv, d = 9, 3, 64


def _c(name, a):
    return helper_const(name, np.asarray(a))


def helper_const(name, a):
    return H.make_node("Constant", [], [name], value=onnx.numpy_helper.from_array(a, name))


def build(kind: str) -> onnx.ModelProto:
    rep = h // kv
    f, i8 = T.FLOAT, T.INT8
    cache = f if kind in ("float", "grouped") else i8
    n = [_c("ax", np.array([2], np.int64)), _c("shp", np.array([1, h, -1, d], np.int64)),
         _c("exp", np.array([1, kv, rep, 1, 1], np.int64)),
         _c("sk", np.full((1, kv, 1, d), 0.05, np.float32)), _c("sv", np.full((1, kv, 1, d), 0.05, np.float32)),
         _c("skh", np.full((1, h, 1, d), 0.05, np.float32)), _c("svh", np.full((1, h, 1, d), 0.05, np.float32)),
         _c("one", np.array(1.0, np.float32)), _c("z8", np.array(0, np.int8)),
         _c("isk", np.full((1, kv, 1, d), 20.0, np.float32)), _c("sc", np.array(0.125, np.float32))]
    k, v = "k", "v"
    if cache == i8:
        n += [H.make_node("Mul", ["k", "isk"], ["ks"]), H.make_node("QuantizeLinear", ["ks", "one", "z8"], ["k8"]),
              H.make_node("Mul", ["v", "isk"], ["vs"]), H.make_node("QuantizeLinear", ["vs", "one", "z8"], ["v8"])]
        k, v = "k8", "v8"
    n += [H.make_node("Concat", ["pk", k], ["present_k"], axis=2), H.make_node("Concat", ["pv", v], ["present_v"], axis=2)]
    K, V, q = "present_k", "present_v", "q"
    if kind in ("dequant", "folded"):
        n += [H.make_node("Cast", [K], ["kf"], to=f), H.make_node("Cast", [V], ["vf"], to=f)]
        K, V = "kf", "vf"
        if kind == "dequant":
            n += [H.make_node("Mul", ["kf", "sk"], ["kd"]), H.make_node("Mul", ["vf", "sv"], ["vd"])]
            K, V = "kd", "vd"
        else:
            n += [H.make_node("Mul", ["q", "skh"], ["qs"])]
            q = "qs"
    for t in ("K", "V"):
        src = K if t == "K" else V
        n += [H.make_node("Unsqueeze", [src, "ax"], [t + "u"]), H.make_node("Expand", [t + "u", "exp"], [t + "e"]),
              H.make_node("Reshape", [t + "e", "shp"], [t + "r"])]
    n += [H.make_node("Transpose", ["Kr"], ["Kt"], perm=[0, 1, 3, 2])]
    if kind.startswith("gqa"):
        return build_gqa(kind)
    if kind.startswith("grouped"):
        return build_grouped(kind, n[:11] + ([x for x in n if x.op_type in ("Mul", "QuantizeLinear", "Concat")
                                              and x.output[0] in ("ks", "k8", "vs", "v8", "present_k", "present_v")]))
    if kind in ("integer", "mixed"):
        n += [H.make_node("Mul", ["q", "skh"], ["qk"]), H.make_node("DynamicQuantizeLinear", ["qk"], ["q8", "qsc", "qzp"]),
              H.make_node("MatMulInteger", ["q8", "Kt", "qzp"], ["si"]), H.make_node("Cast", ["si"], ["sf"], to=f),
              H.make_node("Mul", ["sf", "qsc"], ["s1"]),
              H.make_node("Mul", ["s1", "sc"], ["s"]), H.make_node("Softmax", ["s"], ["p"], axis=-1)]
        if kind == "mixed":   # P·V in float over Cast(V): probabilities keep their precision
            n += [H.make_node("Cast", ["Vr"], ["Vf"], to=f), H.make_node("MatMul", ["p", "Vf"], ["o0"]),
                  H.make_node("Mul", ["o0", "svh"], ["out"])]
        else:
            n += [_c("p_sc", np.array(1 / 255, np.float32)), _c("u0", np.array(0, np.uint8)),
              H.make_node("QuantizeLinear", ["p", "p_sc", "u0"], ["p8"]),
              H.make_node("MatMulInteger", ["p8", "Vr", "u0"], ["oi"]), H.make_node("Cast", ["oi"], ["of"], to=f),
              H.make_node("Mul", ["of", "p_sc"], ["o1"]), H.make_node("Mul", ["o1", "svh"], ["out"])]
    else:
        n += [H.make_node("MatMul", [q, "Kt"], ["s0"]), H.make_node("Mul", ["s0", "sc"], ["s"]),
              H.make_node("Softmax", ["s"], ["p"], axis=-1), H.make_node("MatMul", ["p", "Vr"], ["o0"])]
        n += ([H.make_node("Mul", ["o0", "svh"], ["out"])] if kind == "folded" else
              [H.make_node("Identity", ["o0"], ["out"])])
    return _model(n, kind, cache)


def _model(n: list, kind: str, cache: int) -> onnx.ModelProto:
    """The layer's model: q, k, v and the past cache in, the output and the present cache out."""
    f = T.FLOAT
    ins = [H.make_tensor_value_info("q", f, [1, h, 1, d]), H.make_tensor_value_info("k", f, [1, kv, 1, d]),
           H.make_tensor_value_info("v", f, [1, kv, 1, d]), H.make_tensor_value_info("pk", cache, [1, kv, "P", d]),
           H.make_tensor_value_info("pv", cache, [1, kv, "P", d])]
    outs = [H.make_tensor_value_info("out", f, None), H.make_tensor_value_info("present_k", cache, None),
            H.make_tensor_value_info("present_v", cache, None)]
    m = H.make_model(H.make_graph(n, kind, ins, outs), opset_imports=[H.make_opsetid("", 21)])
    m.ir_version = 10
    return m


def build_grouped(kind: str, n: list) -> onnx.ModelProto:
    """Attention without the repeat-kv copy: Q [1, h, 1, d] -> [1, kv, rep, d] against the cache."""
    f = T.FLOAT
    cache = T.INT8 if kind == "grouped8" else f
    K, V = "present_k", "present_v"
    n = list(n) + [_c("gq", np.array([0, kv, -1, d], np.int64)), _c("back", np.array([1, h, 1, -1], np.int64))]
    n += [H.make_node("Reshape", ["q", "gq"], ["qg"])]
    q = "qg"
    if cache == T.INT8:
        n += [H.make_node("Cast", [K], ["kf"], to=f), H.make_node("Cast", [V], ["vf"], to=f),
              H.make_node("Mul", ["qg", "sk"], ["qgs"])]
        K, V, q = "kf", "vf", "qgs"
    n += [H.make_node("Transpose", [K], ["Kt"], perm=[0, 1, 3, 2]), H.make_node("MatMul", [q, "Kt"], ["s0"]),
          H.make_node("Reshape", ["s0", "back"], ["s1"]), H.make_node("Mul", ["s1", "sc"], ["s"]),
          H.make_node("Softmax", ["s"], ["p"], axis=-1), _c("gp", np.array([0, kv, -1, 0], np.int64)),
          H.make_node("Reshape", ["p", "gp"], ["pg"]), H.make_node("MatMul", ["pg", V], ["o0"])]
    n += ([H.make_node("Mul", ["o0", "sv"], ["o1"]), H.make_node("Reshape", ["o1", "back"], ["out"])]
          if cache == T.INT8 else [H.make_node("Reshape", ["o0", "back"], ["out"])])
    return _model(n, kind, cache)


def build_gqa(kind: str) -> onnx.ModelProto:
    """com.microsoft GroupQueryAttention over the same cache; gqa8: its own int8 per-channel cache."""
    f = T.FLOAT
    cache = T.INT8 if kind == "gqa8" else f
    ins = ["q3", "k3", "v3", "pk", "pv", "seqlens", "total"]
    attrs = dict(num_heads=h, kv_num_heads=kv, scale=0.125)
    n = [H.make_node("Reshape", [t, "s3"], [t + "3"]) for t in ("q", "k", "v")]
    n += [_c("s3", np.array([1, 1, -1], np.int64))]
    if kind == "gqa8":
        ins += ["", "", "", "", "", "sk", "sv"]
        attrs.update(k_quant_type="PER_CHANNEL", v_quant_type="PER_CHANNEL", kv_cache_bit_width=8)
        n += [_c("sk", np.full((1, kv, 1, d), 0.05, np.float32)), _c("sv", np.full((1, kv, 1, d), 0.05, np.float32))]
    n += [H.make_node("GroupQueryAttention", ins, ["out", "present_k", "present_v"], domain="com.microsoft", **attrs)]
    vi = [H.make_tensor_value_info("q", f, [1, h, 1, d]), H.make_tensor_value_info("k", f, [1, kv, 1, d]),
          H.make_tensor_value_info("v", f, [1, kv, 1, d]), H.make_tensor_value_info("pk", cache, [1, kv, "P", d]),
          H.make_tensor_value_info("pv", cache, [1, kv, "P", d]),
          H.make_tensor_value_info("seqlens", T.INT32, [1]), H.make_tensor_value_info("total", T.INT32, [])]
    outs = [H.make_tensor_value_info("out", f, None), H.make_tensor_value_info("present_k", cache, None),
            H.make_tensor_value_info("present_v", cache, None)]
    m = H.make_model(H.make_graph(n, kind, vi, outs), opset_imports=[H.make_opsetid("", 21),
                                                                    H.make_opsetid("com.microsoft", 1)])
    m.ir_version = 10
    return m


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--past", type=int, default=2048)
    ap.add_argument("--seconds", type=float, default=10)
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    kinds = ["float", "dequant", "folded", "mixed", "integer", "gqa", "gqa8", "grouped", "grouped8"]
    sess, feeds = {}, {}
    for kd in kinds:
        path = f"/tmp/kvattn_{kd}_{os.getpid()}.onnx"
        onnx.save(build(kd), path)
        sess[kd] = make_session(path, 2)
        os.unlink(path)
        past = (rng.standard_normal((1, kv, a.past, d)).astype(np.float32) if kd in ("float", "gqa", "grouped") else
                rng.integers(-127, 128, (1, kv, a.past, d)).astype(np.int8))
        feeds[kd] = {"q": rng.standard_normal((1, h, 1, d)).astype(np.float32),
                     "k": rng.standard_normal((1, kv, 1, d)).astype(np.float32),
                     "v": rng.standard_normal((1, kv, 1, d)).astype(np.float32), "pk": past, "pv": past.copy()}
        if kd.startswith("gqa"):
            feeds[kd].update(seqlens=np.array([a.past], np.int32), total=np.array(a.past + 1, np.int32))
    times = {k: [] for k in kinds}
    load0, start, r = os.getloadavg()[0], time.perf_counter(), 0
    while time.perf_counter() - start < a.seconds or r < 3:
        for kd in (kinds if r % 2 == 0 else kinds[::-1]):
            for _ in range(20):
                t = time.perf_counter()
                sess[kd].run(None, feeds[kd])
                times[kd].append(time.perf_counter() - t)
            time.sleep(0.05)
        r += 1
    base = np.median(times["float"])
    print(f"one attention layer, one new token over {a.past} cached slots, h={h} kv={kv} d={d}, 2 threads")
    for kd in kinds:
        m = np.median(times[kd])
        print(f"  {kd:<8} {1e3 * m:7.3f} ms  {m / base:5.2f}x float")
    print(f"load average {load0:.2f} -> {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
