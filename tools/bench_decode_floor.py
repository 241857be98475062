"""How far down a decode step can go with onnxruntime's kernels: each graph timed whole, without
its linear layers, and the interface alone, in one interleaved run.

    python tools/bench_decode_floor.py FP32/model.onnx CAND.onnx [CAND2.onnx ...] [--past 256]
        [--rounds 8] [--steps 25] [--threads 2] [--spinning]

For a with-past graph g, one decode step t(g) (one new token over a cache of --past slots, the
cache reset to the same past before every step) splits as
    t(g) = t_linear(g) + t_rest(g),      t_rest(g) = t(g without its linear layers)
where "without its linear layers" replaces every linear node y = x·W [.., K] -> [.., N] that the
step runs (MatMulNBits, MatMulIntegerToFloat, DynamicQuantizeMatMul, and MatMul / Gemm reading a
constant W) by y = Slice(Tile(x), N) along the last axis: the same shapes, no weight read.
In a `--decode-route` graph only the decode branch is rewritten (the prefill branch runs once).
The interface alone (`io floor`) is a graph with the reference's inputs and outputs that only
appends one slot to each cache tensor (present = Concat(past, 0)) and returns constant logits:
what feeding the cache and fetching the outputs cost in plain onnxruntime.

Every ratio is against the first graph's full step (FP32), all medians of one run: a bar of
r x FP32 cannot be met by a graph whose `linear only` ratio t_linear / t(FP32) already exceeds r,
whatever the rest of the step is rewritten to. Sessions as tools/bench_decode.py builds them
(2 intra-op threads, spinning off unless --spinning; with spinning, an idle session's threads
steal the cores, so read those figures with care).
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import machine  # noqa: E402

from graphpass.graph.decode import DecodeRunner, load_layout  # noqa: E402
from graphpass.graph.io import load_model, save_model  # noqa: E402
from graphpass.graph.runtime import make_session  # noqa: E402

LINEAR = {"MatMulNBits", "MatMulIntegerToFloat", "DynamicQuantizeMatMul"}


def _decode_graphs(g: gs.Graph) -> list[gs.Graph]:
    """The graphs a decode step runs: a routed graph's decode branch (If's then_branch, taken
    when the new tokens number one), else g itself."""
    outs = {t.name for t in g.outputs}
    ifs = [n for n in g.nodes if n.op == "If" and any(t.name in outs for t in n.outputs)]
    return [ifs[0].attrs["then_branch"]] if len(ifs) == 1 else [g]


def _width(n: gs.Node) -> tuple[int, int] | None:
    """(K, N) of a linear node, None if it is not one this tool can read."""
    if n.op == "MatMulNBits":
        return int(n.attrs["K"]), int(n.attrs["N"])
    if n.op in ("MatMul", "Gemm", "MatMulIntegerToFloat", "DynamicQuantizeMatMul") and len(n.inputs) > 1:
        w = n.inputs[1]
        if isinstance(w, gs.Constant) and len(w.shape) == 2 and not (n.op == "Gemm" and n.attrs.get("transB", 0)):
            return int(w.shape[0]), int(w.shape[1])
    return None


def strip_linear(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """model with every linear node of its decode step -> Slice(Tile(x), N); (model, count)."""
    g = gs.import_onnx(model)
    count = 0
    for sub in _decode_graphs(g):
        for n in list(sub.nodes):
            kn = _width(n)
            if kn is None:
                continue
            (k, width), x, y = kn, n.inputs[0], n.outputs[0]
            if n.op == "MatMulIntegerToFloat":   # its input is the quantized x: read it as float
                x = sub.layer(op="Cast", inputs=[x], outputs=[gs.Variable(f"{y.name}_xf", np.float32)],
                              attrs={"to": TensorProto.FLOAT})[0]
            reps = -(-width // k)
            if reps > 1:    # x: [b, s, K] activations
                x = sub.layer(op="Tile", inputs=[x, gs.Constant(f"{y.name}_reps", np.array([1, 1, reps], np.int64))],
                              outputs=[gs.Variable(f"{y.name}_tiled", np.float32)])[0]
            n.outputs.clear()
            n.inputs.clear()
            sub.layer(op="Slice", inputs=[x, gs.Constant(f"{y.name}_s0", np.array([0], np.int64)),
                                          gs.Constant(f"{y.name}_e", np.array([width], np.int64)),
                                          gs.Constant(f"{y.name}_ax", np.array([-1], np.int64))], outputs=[y])
            count += 1
        sub.cleanup().toposort()
    return gs.export_onnx(g), count


def io_floor(reference: onnx.ModelProto, vocab: int) -> onnx.ModelProto:
    """The reference's inputs and outputs; present = Concat(past, zeros), logits a constant."""
    ins = list(reference.graph.input)
    nodes = [helper.make_node("Shape", [ins[0].name], ["ids_shape"]),
             helper.make_node("Concat", ["ids_shape", "vocab"], ["lshape"], axis=0),
             helper.make_node("Expand", ["zero", "lshape"], ["logits"])]
    inits = [numpy_helper.from_array(np.array([vocab], np.int64), "vocab"),
             numpy_helper.from_array(np.zeros(1, np.float32), "zero")]
    for i in ins:
        if not i.name.startswith("past_key_values"):
            continue
        dims = [d.dim_value for d in i.type.tensor_type.shape.dim]
        slot = f"{i.name}_new"
        inits.append(numpy_helper.from_array(np.zeros((1, dims[1], 1, dims[3]), np.float32), slot))
        present = i.name.replace("past_key_values", "present")
        nodes.append(helper.make_node("Concat", [i.name, slot], [present], axis=2))
    g = helper.make_graph(nodes, "io_floor", ins, list(reference.graph.output), inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])


def time_steps(paths: dict[str, str], past: int, rounds: int, steps: int, threads: int, spinning: bool) -> dict:
    """name -> list of step seconds (cache reset to the same `past` slots before each step)."""
    ids = np.random.default_rng(0).integers(0, 1000, (1, past)).astype(np.int64)
    runners = {}
    for name, p in paths.items():
        r = DecodeRunner(make_session(p, threads, spinning=spinning), load_layout(p))
        r.prefill(ids)
        runners[name] = (r, r.cache)
    tok, out = np.array([[5]], np.int64), {n: [] for n in paths}
    for rd in range(rounds):
        for name in (list(runners) if rd % 2 == 0 else list(reversed(runners))):
            r, base = runners[name]
            for i in range(steps + 2):
                r.cache = base
                t0 = time.perf_counter()
                r.step(tok)
                if i >= 2:
                    out[name].append(time.perf_counter() - t0)
            if spinning:
                time.sleep(0.2)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("reference")
    ap.add_argument("candidates", nargs="+")
    ap.add_argument("--past", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--spinning", action="store_true")
    a = ap.parse_args()
    graphs = [a.reference, *a.candidates]
    names = [Path(p).parent.name or Path(p).stem for p in graphs]
    with tempfile.TemporaryDirectory() as tmp:
        paths, stripped = {}, {}
        for name, p in zip(names, graphs):
            paths[name] = p
            model, count = strip_linear(load_model(p))
            out = os.path.join(tmp, f"{name}_rest.onnx")
            save_model(model, out, release=True)
            paths[f"{name} rest"], stripped[name] = out, count
            del model
        ref = load_model(a.reference, load_weights=False)
        floor = os.path.join(tmp, "io_floor.onnx")
        onnx.save(io_floor(ref, _vocab(ref)), floor)
        paths["io floor"] = floor
        load0 = os.getloadavg()[0]
        t = time_steps(paths, a.past, a.rounds, a.steps, a.threads, a.spinning)
    med = {k: float(np.median(v)) * 1e3 for k, v in t.items()}
    base = med[names[0]]
    print(f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {machine()}, {a.threads} threads, "
          f"spinning {'on' if a.spinning else 'off'}, past {a.past}, {a.rounds} rounds x {a.steps} steps, "
          f"load {load0:.2f} -> {os.getloadavg()[0]:.2f}")
    print("| graph | linear nodes | step (ms) | ratio | without linear (ms) | linear only (ms) | linear only / FP32 step |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for n in names:
        lin = med[n] - med[f"{n} rest"]
        print(f"| {n} | {stripped[n]} | {med[n]:.2f} | {med[n] / base:.3f}x | {med[f'{n} rest']:.2f} | {lin:.2f} | "
              f"{lin / base:.3f}x |")
    print(f"| io floor (interface only) | 0 | {med['io floor']:.2f} | {med['io floor'] / base:.3f}x | | | |")
    return 0


def _vocab(model: onnx.ModelProto) -> int:
    """The logits' last dimension, as the graph declares it."""
    out = model.graph.output[0].type.tensor_type.shape.dim
    if out and out[-1].dim_value:
        return out[-1].dim_value
    raise SystemExit(f"{model.graph.output[0].name}: the last dimension of the logits is not declared")


if __name__ == "__main__":
    raise SystemExit(main())
