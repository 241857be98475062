"""Where the time goes: onnxruntime's profiler, kernel time per op type (and per layer kind).

    python tools/profile_ops.py M/model.onnx [OTHER.onnx ...] [--shape 1x512] [--runs 5]

Each model gets one session (2 threads, spinning off, the optimizations onnxruntime applies by
default), two warm-up runs, then `--runs` profiled runs on the same synthetic inputs `bench`
uses (a with-past graph: a prefill of that shape over an empty past). Prints per op type the share of summed kernel time and ms per run, and the same grouped
by what the node is: quantized linear layer, float MatMul reading a constant (e.g. the LM head),
attention (MatMul between two activations, Softmax), or the rest. The profiler adds a small
cost per node, so shares of many small ops read a little high; compare graphs, not absolutes.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections import defaultdict

from graphpass.validate.bench import _prefill_inputs, parse_shape, synthetic_inputs
from graphpass.graph.decode import load_layout
from graphpass.graph.io import input_specs, load_model
from graphpass.graph.runtime import Session, session_options

LINEAR = {"MatMulInteger", "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "QLinearMatMul", "MatMulNBits",
          "DynamicQuantizeLinear", "QuantizeLinear", "DequantizeLinear"}
ATTENTION = {"Softmax", "MultiHeadAttention", "GroupQueryAttention", "Attention"}


def profile(path: str, shape: tuple[int, int], runs: int) -> tuple[dict, dict, float]:
    model = load_model(path, load_weights=False)
    consts = {t.name for t in model.graph.initializer}
    for n in model.graph.node:       # Transpose / DequantizeLinear of constants: constant too
        if n.input and all(i in consts for i in n.input if i):
            consts.update(n.output)
    layout = load_layout(path, model)          # a with-past graph: a prefill over an empty past
    specs = input_specs(model)
    feeds = _prefill_inputs(specs, shape, layout) if layout else synthetic_inputs(specs, shape)
    with tempfile.TemporaryDirectory() as tmp:
        so = session_options(profile=True)
        so.profile_file_prefix = os.path.join(tmp, "trace")
        sess = Session(str(path), so, providers=["CPUExecutionProvider"])
        for _ in range(2):
            sess.run(None, feeds)
        t0 = time.perf_counter()
        for _ in range(runs):
            sess.run(None, feeds)
        wall = (time.perf_counter() - t0) / runs
        trace = sess.end_profiling()
        with open(trace) as f:
            events = json.load(f)
    by_op, by_kind = defaultdict(float), defaultdict(float)
    const_matmuls = {n.name for n in model.graph.node if n.op_type in ("MatMul", "Gemm")
                     and len(n.input) > 1 and n.input[1] in consts}
    quant = _quantizer_nodes(model)
    outs = {o.name for o in model.graph.output}
    heads = {n.name for n in model.graph.node if n.op_type in ("MatMul", "Gemm", "MatMulNBits", "MatMulIntegerToFloat")
             and n.output[0] in outs}
    n_runs = runs + 2
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time"):
            continue
        op, node = e["args"]["op_name"], e["name"][: -len("_kernel_time")]
        ms = e["dur"] / 1e3 / n_runs
        by_op[op] += ms
        if node in heads:
            kind = f"LM head ({op}, writes a graph output)"
        elif op in LINEAR or node in quant or node.split("/")[0] in quant:
            kind = "int8 / N-bit linear layers (with their activation quantizers)"
        elif op in ("MatMul", "Gemm", "FusedMatMul") and node.split("/")[0] in const_matmuls:
            kind = "float MatMul with a constant weight (LM head, float layers)"
        elif op in ("MatMul", "FusedMatMul") or op in ATTENTION:
            kind = "attention (activation x activation MatMuls, Softmax)"
        else:
            kind = "everything else (norms, RoPE, residuals, reshapes, masks)"
        by_kind[kind] += ms
    return by_op, by_kind, wall


def _quantizer_nodes(model) -> set[str]:
    """Names of the nodes around each integer MatMul: its activation quantizer (Abs, ReduceMax,
    Div, QuantizeLinear, DynamicQuantizeLinear) and its rescale (Cast, Mul)."""
    prod = {o: n for n in model.graph.node for o in n.output}
    readers: dict[str, list] = {}
    for n in model.graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    back = {"QuantizeLinear", "DynamicQuantizeLinear", "Div", "ReduceMax", "Abs"}
    out = set()
    for n in model.graph.node:
        if n.op_type not in ("MatMulInteger", "MatMulIntegerToFloat"):
            continue
        out.add(n.name)
        todo = [n.input[0]]
        while todo:
            p = prod.get(todo.pop())
            if p is not None and p.op_type in back and p.name not in out:
                out.add(p.name)
                todo.extend(p.input[:2])
        y = n.output[0]
        for _ in range(2):             # Cast, then the Mul by the scales
            nxt = [r for r in readers.get(y, []) if r.op_type in ("Cast", "Mul")]
            if len(nxt) != 1:
                break
            out.add(nxt[0].name)
            y = nxt[0].output[0]
    return out


def table(title: str, rows: dict, top: int) -> str:
    total = sum(rows.values())
    lines = [f"| {title} | share | ms/run |", "|---|---:|---:|"]
    for k, v in sorted(rows.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"| {k} | {100 * v / total:.1f}% | {v:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="+")
    p.add_argument("--shape", default="1x512", type=parse_shape)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--top", type=int, default=12, help="op types listed per model")
    a = p.parse_args(argv)
    for path in a.models:
        by_op, by_kind, wall = profile(path, a.shape, a.runs)
        print(f"\n### {path} ({a.shape[0]}x{a.shape[1]}, {wall * 1e3:.0f} ms per profiled run)\n")
        print(table("op type", by_op, a.top) + "\n")
        print(table("kind", by_kind, 10))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
