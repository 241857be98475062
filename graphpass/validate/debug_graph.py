"""One graph that runs a reference and a candidate side by side and returns only per-channel sums.

The reference keeps its names; every candidate name gets the prefix "q/"; both read the same
graph inputs. T̂ is the candidate's tensor of T's name, except for a layer's input X: there it is
the tensor the candidate's layer reads (graphpass.match.rewritten; smoothing moves the readers of a
norm that also feeds a residual to a copy of it). For every compared tensor T ([.., C], flattened
to [rows, C]) and a gain input g_T:
  s = Σ T²,  e = Σ (g_T·T̂ − T)²                      (scalars)
and, where g_T must be fitted on data (graphpass.debug), the channel vectors
  a = Σ_rows T²,  b = Σ_rows T̂²,  c = Σ_rows T·T̂
and for every linear layer Y = X·W whose input X is compared, a copy of the reference node run
on the candidate's own input, Y_loc = (g_X·X̂)·W (same weight tensor, no copy), with
  l = Σ Y_loc²,  m = Σ (g_Y·Ŷ − Y_loc)²              (the error the layer adds by itself)
The merged model is saved beside the reference with every large weight as external data (see
WeightFolder): onnxruntime memory-maps it, so each weight sits in memory once.
"""
from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from graphpass.validate.debug_gains import weight_gains
from graphpass.validate.debug_kv import add_recast, recast_past
from graphpass.validate.debug_weights import WeightFolder, move_initializers, shared_weights
from graphpass.validate.debug_wide import WIDE, Wide, head_model
from graphpass.errors import GraphpassError
from graphpass.graph.consts import Consts
from graphpass.graph.gs_io import export_into, import_graph, metadata
from graphpass.graph.io import input_specs, load_model, opset_version
from graphpass.match.linears import label
from graphpass.match.rewritten import read_rewritten
from graphpass.match.sites import analyze, rescaled_channels

PREFIX = "q/"


@dataclass
class Pair:
    """A reference linear layer and its counterpart in the candidate."""
    name: str                          # label of the reference node
    tensor: str                        # its output tensor, same name in both graphs
    index: int                         # position among the reference's linear layers
    quantized: bool                    # False: the candidate still runs it as a float MatMul/Gemm
    node: onnx.NodeProto | None = None  # the reference node (for the local copy)
    act: str = ""                      # its input X, when the candidate's counterpart is known
    module: str = ""                   # exporter's module path (node metadata), for display
    lin: object = None                 # the reference's graphpass.linears.Linear
    note: str = ""                     # why a figure of this row is missing or not exact


@dataclass
class Merged:
    path: Path                                          # merged model inside its weight folder
    folder: WeightFolder
    pairs: list[Pair]
    unmatched: list[str]
    tensors: list[str]                                  # compared tensors, in output order
    local: list[int] = field(default_factory=list)      # pairs (by position) with a local copy
    rescalable: dict[str, np.ndarray | None] = field(default_factory=dict)  # tensor -> channels
    #                                                   smoothing may rescale (None: all; match.sites)
    gains: dict[str, np.ndarray] = field(default_factory=dict)  # of those, read from the weights
    twins: dict[str, str] = field(default_factory=dict)  # X -> the candidate's X̂ where names differ

    fit: set[str] = field(default_factory=set)          # rescalable, gain not in the weights
    wide: list[Wide] = field(default_factory=list)      # layers reduced in row chunks (debug_wide)
    recast: dict[str, np.ndarray] = field(default_factory=dict)  # int8 past inputs: m = 1/s (debug_kv)

    def outputs(self) -> list[str]:
        """Per tensor: Σ T², Σ (g·T̂ − T)² (+ the three channel vectors when its gain is fitted);
        then per local copy: Σ Y_loc², Σ (g·Ŷ − Y_loc)². Wide layers' sums are not among them."""
        ks, iw = {w.k for w in self.wide}, {w.i for w in self.wide}
        outs = []
        for k, t in enumerate(self.tensors):
            if k not in ks:
                outs += [f"gp_dbg_{k}_{x}" for x in ("se" + ("abc" if t in self.fit else ""))]
        return outs + [f"gp_dbg_loc{i}_{x}" for i in self.local if i not in iw for x in "lm"]

    def wide_outputs(self) -> list[str]:
        """What the wide layers' sums read from the merged graph: X, Ŷ (and X̂) of each."""
        return list(dict.fromkeys(t for w in self.wide for t in (w.act, PREFIX + w.tensor, w.cand_act) if t))

    def gain_input(self, tensor: str) -> str:
        return f"gp_dbg_{self.tensors.index(tensor)}_gain"

    def twin(self, tensor: str) -> str:
        """The candidate's counterpart of a compared tensor, as named in the merged graph."""
        return PREFIX + self.twins.get(tensor, tensor)


def match_layers(ref: onnx.ModelProto, cand: onnx.ModelProto, ref_dir: str | None):
    """(pairs, labels of the reference's linear layers with no counterpart, the reference's
    Analysis, {X: X̂} where the candidate's layers read an input of another name), matched by
    output tensor name. X̂ is what the candidate's layer reads (graphpass.match.rewritten): after
    smoothing duplicated a norm, the reference's X still exists in the candidate unsmoothed."""
    an = analyze(ref, ref_dir)
    c = Consts(import_graph(cand))           # structure only: no weight of the candidate is read
    tensors = c.graph.tensors()
    protos = {n.output[0]: n for n in ref.graph.node if n.output}   # the local copies are protobuf
    pairs, unmatched, twins = [], [], {}
    for k, lin in enumerate(an.linears):
        y = lin.node.outputs[0].name
        prod = c.producer(tensors.get(y)) if y in tensors else None
        if prod is None:
            unmatched.append(label(lin.node))
            continue
        rw = read_rewritten(c, tensors[y])
        pair = Pair(label(lin.node), y, k, rw is None or rw.form != "float", protos[y], "",
                    module_path(lin.node), lin)
        pair.act, pair.note = _input_twin(c, tensors, lin.act, rw, twins)
        pairs.append(pair)
    return pairs, unmatched, an, twins


def _input_twin(c: Consts, tensors: dict, x: str, rw, twins: dict[str, str]) -> tuple[str, str]:
    """(X to compare or '', note) for a layer the candidate writes as `rw` (None: a form not
    recognized); records X -> X̂ in `twins`."""
    if rw is None:
        if x in tensors and c.producer(tensors[x]) is not None:
            return x, "layer form not recognized: its input is compared by name"
        return "", "layer form not recognized and no input of that name: no input or layer dB"
    if c.producer(rw.x) is None:
        return "", "the candidate's layer reads a graph input: no input or layer dB"
    if twins.setdefault(x, rw.x.name) != rw.x.name:
        return "", (f"reads {rw.x.name}, while another reader of {x} reads {twins[x]}: "
                    "no input or layer dB")
    return x, ""


def module_path(node) -> str:
    """'layers.3.mlp.down_proj' from the torch exporter's name scopes, or '' when absent."""
    for key, value in metadata(node).items():
        if key == "pkg.torch.onnx.name_scopes":
            try:
                scopes = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                return ""
            path = ""
            for sc in map(str, scopes):          # the dotted chain; the last entry is the fx node
                if sc and not sc.startswith(path):
                    break
                path = sc
            return re.sub(r"^(model\.)+", "", path)
    return ""


# ---------------------------------------------------------------------------- renaming
def _rename(name: str, keep: dict[str, str]) -> str:
    """A candidate name in the merged graph: shared ones (graph inputs, weights equal to the
    reference's) map to the reference's name, every other name gets the prefix."""
    return keep.get(name, PREFIX + name) if name else name


def _prefix_in_place(n: onnx.NodeProto, keep: dict[str, str]) -> None:
    n.name = PREFIX + n.name if n.name else ""
    n.input[:] = [_rename(i, keep) for i in n.input]
    n.output[:] = [_rename(o, keep) for o in n.output]
    for a in n.attribute:
        for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
            for sub in g.node:
                _prefix_in_place(sub, keep)
            for vi in list(g.input) + list(g.output) + list(g.value_info):
                vi.name = _rename(vi.name, keep)
            for t in g.initializer:
                t.name = _rename(t.name, keep)


# ---------------------------------------------------------------------------- sums
def _reduce(g: onnx.GraphProto, op: str, x: str, out: str, axes: list[int] | None, opset: int) -> None:
    ins, kw = [x], {}
    if axes is not None:
        if opset >= 18:
            ax = f"{out}__axes"
            g.initializer.append(helper.make_tensor(ax, TensorProto.INT64, [len(axes)], axes))
            ins.append(ax)
        else:
            kw["axes"] = axes
    g.node.append(helper.make_node(op, ins, [out], name=out, keepdims=0, **kw))
    g.output.append(helper.make_tensor_value_info(out, TensorProto.FLOAT, None))


def _nodes(g: onnx.GraphProto, p: str, spec) -> None:
    """spec: (op, inputs, output, attrs); names without a '/' or ':' are local to prefix p."""
    for op, ins, out, kw in spec:
        g.node.append(helper.make_node(op, ins, [p + out], name=p + out, **kw))


def _tensor_sums(g: onnx.GraphProto, k: int, t: str, tq: str, opset: int, fit: bool) -> None:
    p = f"gp_dbg_{k}_"
    g.input.append(helper.make_tensor_value_info(p + "gain", TensorProto.FLOAT, [None]))
    _nodes(g, p, [("Flatten", [t], "fy", {"axis": -1}), ("Flatten", [tq], "fq", {"axis": -1}),
                  ("Mul", [p + "fq", p + "gain"], "gq", {}), ("Sub", [p + "gq", p + "fy"], "d", {})])
    _reduce(g, "ReduceSumSquare", p + "fy", p + "s", None, opset)
    _reduce(g, "ReduceSumSquare", p + "d", p + "e", None, opset)
    if fit:                                       # per-channel sums for a gain fitted on data
        _nodes(g, p, [("Mul", [p + "fy", p + "fq"], "yq", {})])
        for tag, x, op in (("a", "fy", "ReduceSumSquare"), ("b", "fq", "ReduceSumSquare"),
                           ("c", "yq", "ReduceSum")):
            _reduce(g, op, p + x, p + tag, [0], opset)


def _local_sums(g: onnx.GraphProto, i: int, pair: Pair, xq: str, gx: str, gy: str, opset: int) -> None:
    p = f"gp_dbg_loc{i}_"
    _nodes(g, p, [("Mul", [xq, gx], "x", {})])
    copy = onnx.NodeProto()
    copy.CopyFrom(pair.node)
    copy.name, copy.input[0] = p + "node", p + "x"
    copy.output[:] = [p + "y"]
    g.node.append(copy)
    _nodes(g, p, [("Flatten", [p + "y"], "fy", {"axis": -1}),
                  ("Flatten", [PREFIX + pair.tensor], "fq", {"axis": -1}),
                  ("Mul", [p + "fq", gy], "gq", {}), ("Sub", [p + "gq", p + "fy"], "d", {})])
    _reduce(g, "ReduceSumSquare", p + "fy", p + "l", None, opset)
    _reduce(g, "ReduceSumSquare", p + "d", p + "m", None, opset)


def _scratch(g: onnx.GraphProto, build) -> onnx.GraphProto:
    """Run `build` on an empty graph; its inputs, outputs and initializers move to `g` at once,
    its nodes are left for the caller to place."""
    h = onnx.GraphProto()
    build(h)
    g.input.extend(h.input)
    g.output.extend(h.output)
    g.initializer.extend(h.initializer)
    return h


def build_merged(ref_path: Path, cand_path: Path, local: bool = True) -> Merged:
    ref = load_model(ref_path, load_weights=False)
    cand = load_model(cand_path, load_weights=False)
    if opset_version(ref) != opset_version(cand):
        raise GraphpassError(f"{cand_path}: opset {opset_version(cand)} differs from the reference's "
                             f"{opset_version(ref)}; debug needs both graphs at one opset")
    ref_in = {s.name for s in input_specs(ref)}
    missing = [s.name for s in input_specs(cand) if s.name not in ref_in]
    if missing:
        raise GraphpassError(f"{cand_path}: input(s) {', '.join(missing)} are not inputs of the reference")
    recast = recast_past(ref, cand, cand_path.parent.resolve())      # an int8 KV cache: its own past
    pairs, unmatched, an, twins = match_layers(ref, cand, str(ref_path.parent.resolve()))
    if not pairs:
        raise GraphpassError(f"{cand_path}: no linear layer output of the reference is found by name")
    g, opset = onnx.GraphProto(name="graphpass_debug"), opset_version(ref)
    g.input.extend(i for i in ref.graph.input if i.name in ref_in)
    g.node.extend(ref.graph.node)
    g.value_info.extend(ref.graph.value_info)
    scalable = rescaled_channels(an)
    gains, odd = weight_gains(pairs, an.consts, cand, str(cand_path.parent.resolve()), scalable)
    for p in pairs:
        if p.tensor in odd and not p.note:
            p.note = ("W' is not diag(s)·W on columns no smoothing fold names (a column rescale such as "
                      "--kv-smooth's, or a weight error): counted as error")
    acts = {p.act for p in pairs}
    wide = {p.tensor for p in pairs if p.lin.shape(an.consts)[1] >= WIDE and p.tensor not in scalable.keys() | acts}
    folder = WeightFolder(ref_path.parent.resolve())
    try:
        return _fill(g, ref, cand, ref_path, cand_path, folder, pairs, unmatched, opset, local,
                     scalable, gains, wide, recast, twins)
    except BaseException:
        folder.remove()
        raise


def _fill(g, ref, cand, ref_path, cand_path, folder, pairs, unmatched, opset, local, scalable, gains,
          wide, recast, twins) -> Merged:
    ref_base, cand_base = ref_path.parent.resolve(), cand_path.parent.resolve()
    shared = shared_weights(ref.graph, cand.graph, ref_base, cand_base)
    keep = {i.name: i.name for i in g.input if i.name not in recast} | shared
    move_initializers(ref.graph, g, ref_base, lambda n: n, folder)
    add_recast(g, recast, PREFIX)
    for n in cand.graph.node:
        g.node.add().CopyFrom(n)
        _prefix_in_place(g.node[-1], keep)
    for vi in cand.graph.value_info:
        g.value_info.add().CopyFrom(vi)
        g.value_info[-1].name = _rename(vi.name, keep)
    move_initializers(cand.graph, g, cand_base, lambda n: _rename(n, keep), folder, set(shared))
    folder.close()
    depth = {o: k for k, n in enumerate(ref.graph.node) for o in n.output}
    tensors = sorted(dict.fromkeys([p.tensor for p in pairs] + [p.act for p in pairs if p.act]),
                     key=lambda t: depth.get(t, -1))
    res = Merged(folder.path, folder, pairs, unmatched, tensors,
                 rescalable={t: v for t, v in scalable.items() if t in tensors},
                 gains={t: v for t, v in gains.items() if t in tensors}, recast=recast,
                 twins={x: t for x, t in twins.items() if t != x and x in tensors})
    res.fit = set(res.rescalable) - set(res.gains)
    opsets = {o.domain: o.version for o in list(cand.opset_import) + list(ref.opset_import)}
    opset_ids = [helper.make_opsetid(d, v) for d, v in opsets.items()]
    res.wide = _wide(g, res, wide, local, folder, opset_ids, max(ref.ir_version, cand.ir_version))
    wide_k, wide_i = {w.k for w in res.wide}, {w.i for w in res.wide}
    groups = []                                  # (depth, scratch graph holding one group's nodes)
    for k, t in enumerate(tensors):
        if k not in wide_k:
            groups.append((depth.get(t, -1), _scratch(g, lambda h: _tensor_sums(h, k, t, res.twin(t), opset, t in res.fit))))
    for i, pair in enumerate(pairs):
        if local and pair.act and pair.quantized:
            res.local.append(i)
            if i in wide_i:
                continue
            gx, gy = res.gain_input(pair.act), res.gain_input(pair.tensor)
            groups.append((depth.get(pair.tensor, -1) + 0.5,
                           _scratch(g, lambda h: _local_sums(h, i, pair, res.twin(pair.act), gx, gy, opset))))
    # onnxruntime orders nodes by a depth-first walk up from the leaves, the last leaf first: the
    # shallowest sums go last so each runs as soon as its tensors exist and they are freed early.
    for _, h in sorted(groups, key=lambda x: -x[0]):
        g.node.extend(h.node)
    g.output.extend(helper.make_tensor_value_info(t, TensorProto.FLOAT, None) for t in res.wide_outputs())
    m = helper.make_model(g, opset_imports=opset_ids)
    m.ir_version = max(ref.ir_version, cand.ir_version)
    m.functions.extend(ref.functions)
    known = {(f.domain, f.name) for f in ref.functions}
    m.functions.extend(f for f in cand.functions if (f.domain, f.name) not in known)
    gm = import_graph(m)                         # weights are external or small: cheap
    export_into(m, gm.cleanup())                 # drops nodes no sum depends on (unmatched heads, ...)
    onnx.save_model(m, str(res.path))
    return res


def _wide(g, mg: Merged, wide, local, folder, opsets, ir_version) -> list[Wide]:
    """The wide pairs whose reference layer stands alone (debug_wide), each saved in `folder`."""
    out = []
    producers = {o: n for n in g.node for o in n.output}
    for i, pair in enumerate(mg.pairs):
        if pair.tensor not in wide or producers.get(pair.tensor) is None:
            continue
        m = head_model(g, producers[pair.tensor], opsets, ir_version)
        if m is None:
            continue
        path = folder.path.with_suffix(f".head{i}.onnx")
        folder.created.append(path)
        onnx.save_model(m, str(path))
        xq = mg.twin(pair.act) if local and pair.act and pair.quantized else ""
        out.append(Wide(mg.tensors.index(pair.tensor), i, pair.tensor, pair.node.input[0], xq, path))
    return out
