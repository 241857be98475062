"""One linear layer of SmolLM2's shapes in each kernel form onnxruntime offers, at M=1 and M=256.

    python tools/bench_kernels.py [--seconds 1.5] [--threads 2] [--m 1 256]

Forms (W [K, N] random, X [1, M, K] random float32):
  fp32     MatMul(X, W)
  token    the graphpass `token` W8A8 form after --decode-fusions: Abs, ReduceMax, Max, Mul, Div,
           QuantizeLinear(uint8, zp 128), MatMulIntegerToFloat(Xq, Wq s8 [K, N], r, w, 128)
  mitof    MatMulIntegerToFloat alone, Xq uint8 fed as a graph input (the kernel's own time)
  nbits8   MatMulNBits 8-bit symmetric, block 32 / 64 / 128, accuracy_level 4
  nbits4   MatMulNBits 4-bit symmetric, block 32 / 128, accuracy_level 4
For each: median microseconds per run (blocks of runs, 2 intra-op threads, spinning off) and the
weight bytes read per run divided by the time (GB/s): at M=1 a memory-bound kernel reads its
weight once, so GB/s near the machine's bandwidth means the kernel is not the limit.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from graphpass.graph.runtime import make_session  # noqa: E402
from graphpass.passes.nbits import pack  # noqa: E402
from graphpass.passes.qforms import quantize_weight  # noqa: E402

SHAPES = [(576, 576), (576, 192), (576, 1536), (1536, 576), (576, 49152)]
MS = "com.microsoft"


def _model(nodes, inits, inputs, n) -> bytes:
    g = helper.make_graph(nodes, "k", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "m", n])],
                          [numpy_helper.from_array(a, k) for k, a in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(MS, 1)])
    return m


def _x(k, dtype=TensorProto.FLOAT, name="x"):
    return helper.make_tensor_value_info(name, dtype, [1, "m", k])


def fp32(w):
    k, n = w.shape
    return _model([helper.make_node("MatMul", ["x", "w"], ["y"])], {"w": w}, [_x(k)], n), w.nbytes


def token(w):
    k, n = w.shape
    wq, ws = quantize_weight(w)
    nodes = [helper.make_node("Abs", ["x"], ["a"]),
             helper.make_node("ReduceMax", ["a", "ax"], ["r0"], keepdims=1),
             helper.make_node("Max", ["r0", "eps"], ["r1"]),
             helper.make_node("Mul", ["r1", "inv"], ["r"]),
             helper.make_node("Div", ["x", "r"], ["xs"]),
             helper.make_node("QuantizeLinear", ["xs", "one", "z"], ["xq"]),
             helper.make_node("MatMulIntegerToFloat", ["xq", "wq", "r", "ws", "z"], ["y"], domain=MS)]
    inits = {"ax": np.array([-1], np.int64), "eps": np.float32(1e-30), "inv": np.float32(1 / 127),
             "one": np.float32(1), "z": np.uint8(128), "wq": wq, "ws": ws}
    return _model(nodes, inits, [_x(k)], n), wq.nbytes


def mitof(w):
    k, n = w.shape
    wq, ws = quantize_weight(w)
    nodes = [helper.make_node("MatMulIntegerToFloat", ["xq", "wq", "one", "ws", "z"], ["y"], domain=MS)]
    inits = {"one": np.float32(0.01), "z": np.uint8(128), "wq": wq, "ws": ws}
    return _model(nodes, inits, [_x(k, TensorProto.UINT8, "xq")], n), wq.nbytes


def nbits(bits, block):
    def build(w):
        k, n = w.shape
        p = pack(w, bits, block)
        nodes = [helper.make_node("MatMulNBits", ["x", "b", "s"], ["y"], domain=MS, K=k, N=n, bits=bits,
                                  block_size=block, accuracy_level=4)]
        return _model(nodes, {"b": p.b, "s": p.scales}, [_x(k)], n), p.b.nbytes + p.scales.nbytes
    return build


FORMS = {"fp32": fp32, "token": token, "mitof": mitof, "nbits8_b32": nbits(8, 32), "nbits8_b64": nbits(8, 64),
         "nbits8_b128": nbits(8, 128), "nbits8_b256": nbits(8, 256), "nbits4_b32": nbits(4, 32), "nbits4_b128": nbits(4, 128)}


def time_it(sess, feed, seconds: float) -> float:
    """Median microseconds per run over blocks of runs filling `seconds`."""
    for _ in range(3):
        sess.run(None, feed)
    t0 = time.perf_counter()
    sess.run(None, feed)
    one = max(time.perf_counter() - t0, 1e-6)
    per_block = max(1, int(0.05 / one))
    blocks = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end or len(blocks) < 5:
        t0 = time.perf_counter()
        for _ in range(per_block):
            sess.run(None, feed)
        blocks.append((time.perf_counter() - t0) / per_block)
    return statistics.median(blocks) * 1e6


def _linear(form, w, x, y, nodes, inits, tag, shared):
    """Nodes computing y = x·w in `form` (the token quantizer of x shared across its readers)."""
    k, n = w.shape
    if form == "fp32":
        inits[f"w{tag}"] = w
        nodes.append(helper.make_node("MatMul", [x, f"w{tag}"], [y]))
        return w.nbytes
    if form == "token":
        if x not in shared:
            q = f"{x}_q"
            nodes += [helper.make_node("Abs", [x], [f"{q}a"]),
                      helper.make_node("ReduceMax", [f"{q}a", "ax"], [f"{q}r0"], keepdims=1),
                      helper.make_node("Max", [f"{q}r0", "eps"], [f"{q}r1"]),
                      helper.make_node("Mul", [f"{q}r1", "inv"], [f"{q}r"]),
                      helper.make_node("Div", [x, f"{q}r"], [f"{q}xs"]),
                      helper.make_node("QuantizeLinear", [f"{q}xs", "one", "z"], [f"{q}xq"])]
            shared[x] = q
        q = shared[x]
        wq, ws = quantize_weight(w)
        inits[f"w{tag}"], inits[f"s{tag}"] = wq, ws
        nodes.append(helper.make_node("MatMulIntegerToFloat", [f"{q}xq", f"w{tag}", f"{q}r", f"s{tag}", "z"], [y],
                                      domain=MS))
        return wq.nbytes
    bits, block = int(form[5]), int(form.split("_b")[1])
    p = pack(w, bits, block)
    inits[f"w{tag}"], inits[f"s{tag}"] = p.b, p.scales
    nodes.append(helper.make_node("MatMulNBits", [x, f"w{tag}", f"s{tag}"], [y], domain=MS, K=k, N=n, bits=bits,
                                  block_size=block, accuracy_level=4))
    return p.b.nbytes + p.scales.nbytes


def stack(form: str, layers: int, rng, head: bool = True) -> tuple[onnx.ModelProto, int]:
    """`layers` blocks of SmolLM2's seven linear layers (q, k, v, o, gate, up, down; distinct random
    weights, so the weights do not stay in cache as one repeated layer's would) + the 576x49152 head."""
    nodes, inits, shared, outs, total = [], {}, {}, [], 0
    inits.update({"ax": np.array([-1], np.int64), "eps": np.float32(1e-30), "inv": np.float32(1 / 127),
                  "one": np.float32(1), "z": np.uint8(128)})
    h = "x"
    packed = form.endswith("_packed")
    form = form.removesuffix("_packed")
    inits["qkv_split"], inits["gu_split"] = np.array([576, 192, 192], np.int64), np.array([1536, 1536], np.int64)
    for i in range(layers):
        w = lambda k, n: (rng.standard_normal((k, n)) * (1 / np.sqrt(k))).astype(np.float32)  # noqa: E731
        if packed:     # q/k/v as one 576x960 layer, gate/up as one 576x3072, then Split
            total += _linear(form, w(576, 960), h, f"qkv{i}", nodes, inits, f"qkv{i}", shared)
            nodes.append(helper.make_node("Split", [f"qkv{i}", "qkv_split"], [f"q{i}", f"k{i}", f"v{i}"], axis=-1))
            total += _linear(form, w(576, 576), f"q{i}", f"o{i}", nodes, inits, f"o{i}", shared)
            total += _linear(form, w(576, 3072), f"o{i}", f"gu{i}_", nodes, inits, f"gu{i}", shared)
            nodes.append(helper.make_node("Split", [f"gu{i}_", "gu_split"], [f"g{i}", f"u{i}"], axis=-1))
        layer = () if packed else (("q", h, (576, 576)), ("k", h, (576, 192)), ("v", h, (576, 192)),
                                   ("o", f"q{i}", (576, 576)), ("g", f"o{i}", (576, 1536)), ("u", f"o{i}", (576, 1536)))
        for name, src, (k, n) in layer:
            total += _linear(form, w(k, n), src, f"{name}{i}", nodes, inits, f"{name}{i}", shared)
        nodes.append(helper.make_node("Mul", [f"g{i}", f"u{i}"], [f"gu{i}"]))
        total += _linear(form, w(1536, 576), f"gu{i}", f"d{i}", nodes, inits, f"d{i}", shared)
        nodes.append(helper.make_node("Add", [f"d{i}", h], [f"h{i}"]))
        outs += [f"k{i}", f"v{i}"]
        h = f"h{i}"
    if head:
        total += _linear(form, (rng.standard_normal((576, 49152)) * 0.05).astype(np.float32), h, "y", nodes, inits,
                         "head", shared)
    else:
        nodes.append(helper.make_node("Identity", [h], ["y"]))
    vi = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    vi += [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outs]
    g = helper.make_graph(nodes, "stack", [_x(576)], vi, [numpy_helper.from_array(a, k) for k, a in inits.items()])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(MS, 1)]), total


def main_stack(args) -> int:
    rng = np.random.default_rng(0)
    print(f"| form | weights MB | " + " | ".join(f"M={m}" for m in args.m) + " |")
    print("|---|---:|" + "---:|" * len(args.m))
    for form in args.forms:
        if form not in FORMS and form.removesuffix("_packed") not in FORMS or form == "mitof":
            continue
        model, nbytes = stack(form, args.layers, rng, head=not args.no_head)
        sess = make_session(model, args.threads)
        del model
        cells = []
        for m in args.m:
            x = rng.standard_normal((1, m, 576)).astype(np.float32)
            us = time_it(sess, {"x": x}, args.seconds)
            cells.append(f"{us / 1e3:,.2f} ms" + (f" ({nbytes / us / 1e3:.1f} GB/s)" if m == 1 else ""))
        print(f"| {form} | {nbytes / 1e6:.0f} | " + " | ".join(cells) + " |", flush=True)
        del sess
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=1.5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--m", type=int, nargs="+", default=[1, 256])
    ap.add_argument("--forms", nargs="+", default=list(FORMS))
    ap.add_argument("--stack", action="store_true", help="SmolLM2's 30 layers of linear layers + head in one graph")
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--no-head", action="store_true")
    args = ap.parse_args(argv)
    if args.stack:
        return main_stack(args)
    rng = np.random.default_rng(0)
    print(f"| K x N | M | " + " | ".join(args.forms) + " |")
    print("|---|---:|" + "---:|" * len(args.forms))
    for k, n in SHAPES:
        w = (rng.standard_normal((k, n)) * 0.05).astype(np.float32)
        built = {f: FORMS[f](w) for f in args.forms}
        sessions = {f: make_session(b, args.threads) for f, (b, _) in built.items()}
        for m in args.m:
            x = rng.standard_normal((1, m, k)).astype(np.float32)
            xq = rng.integers(0, 255, (1, m, k), dtype=np.uint8)
            cells = []
            for f, sess in sessions.items():
                us = time_it(sess, {"xq": xq} if f == "mitof" else {"x": x}, args.seconds)
                gbs = built[f][1] / us / 1e3
                cells.append(f"{us:,.0f} us ({gbs:.1f} GB/s)" if m == 1 else f"{us:,.0f} us")
            print(f"| {k}x{n} | {m} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
