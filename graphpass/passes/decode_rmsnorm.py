"""Residual Add + decomposed RMSNorm -> com.microsoft SkipSimplifiedLayerNormalization.

Exported:  y = γ · (x / sqrt(mean_last(x²) + ε))   as Pow, ReduceMean, Add, Sqrt, Div(1, ·) or
           Div(x, ·), Mul, and Casts to float (identity on float32), with γ a constant [h].
When x = Add(a, b), the Add joins the norm — the same function up to rounding:
           y, _, _, x = SkipSimplifiedLayerNormalization(a, b, γ, ε)
whose fourth output is a + b, so the residual readers keep reading the same sum.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from graphpass.passes.decode_match import NoMatch, const, expect, producer, scalar, skip

MS = "com.microsoft"


def _float_cast(n: gs.Node | None) -> bool:
    return n is not None and n.op == "Cast" and int(n.attrs.get("to", 0)) == 1


def match_rmsnorm(final: gs.Node) -> tuple[gs.Variable, gs.Constant, float, gs.Variable, list[gs.Node]]:
    """final = Mul(γ, normed) -> (x, γ, ε, xc = x or its float Cast, the two nodes reading xc).

    γ's values are never read (only its shape), so an external weight stays on disk."""
    if final.op != "Mul":
        raise NoMatch("not a Mul")
    gi = [i for i in (0, 1) if isinstance(final.inputs[i], gs.Constant) and final.inputs[i].shape is not None
          and len(final.inputs[i].shape) == 1]
    if len(gi) != 1:
        raise NoMatch("no constant 1-D gamma")
    gamma, t = final.inputs[gi[0]], skip(final.inputs[1 - gi[0]], "Cast")
    m = producer(t)
    if m is None or m.op not in ("Mul", "Div"):
        raise NoMatch("normed value is not x·(1/rms) or x/rms")
    if m.op == "Div":
        xc, sq = m.inputs
    else:
        divs = [x for x in m.inputs if (p := producer(x)) is not None and p.op in ("Div", "Reciprocal")]
        if len(divs) != 1:
            raise NoMatch("normed value is not x·(1/rms)")
        d = producer(divs[0])
        if d.op == "Div" and scalar(d.inputs[0]) != 1.0:
            raise NoMatch("inverse rms is not 1/sqrt(·)")
        xc, sq = m.inputs[1] if m.inputs[0] is divs[0] else m.inputs[0], d.inputs[-1]
    add = expect(expect(sq, "Sqrt").inputs[0], "Add")
    eps = [scalar(x) for x in add.inputs]
    if eps.count(None) != 1:
        raise NoMatch("epsilon is not a constant scalar")
    rm = expect(add.inputs[eps.index(None)], "ReduceMean")
    axes = const(rm.inputs[1]) if len(rm.inputs) > 1 else np.array(rm.attrs.get("axes", []))
    if axes is None or axes.size != 1 or int(axes.reshape(-1)[0]) != -1 or int(rm.attrs.get("keepdims", 1)) != 1:
        raise NoMatch("mean is not over the last axis with keepdims")
    pw = expect(rm.inputs[0], "Pow")
    if scalar(pw.inputs[1]) != 2.0 or pw.inputs[0] is not xc:
        raise NoMatch("mean is not of x squared")
    x = skip(xc, "Cast") if _float_cast(producer(xc)) else xc
    if getattr(x, "dtype", None) not in (np.float32, None) or int(gamma.shape[0]) != _last_dim(x, gamma):
        raise NoMatch("input is not float32 or gamma does not match the last axis")
    return x, gamma, float(eps[1 - eps.index(None)]), xc, [pw, m]


def _last_dim(x, gamma) -> int:
    shape = getattr(x, "shape", None)
    d = shape[-1] if shape else None
    return int(d) if isinstance(d, (int, np.integer)) else int(gamma.shape[0])


def fuse_rmsnorm(g: gs.Graph) -> int:
    """Fuse every RMSNorm that sits on a residual Add; returns how many.

    A norm with no Add before it stays decomposed: onnxruntime fuses that one itself when it loads
    the graph (to SimplifiedLayerNormalization, an op it registers in the ONNX domain, which
    onnx.checker does not know)."""
    found = []
    for n in g.nodes:
        try:
            found.append((n, *match_rmsnorm(n)))
        except NoMatch:
            pass
    done = 0
    for final, x, gamma, eps, xc, inner in found:
        add = producer(x)
        if add is None or add.op != "Add" or len(add.inputs) != 2 or x in g.outputs \
                or not all(isinstance(i, gs.Variable) for i in add.inputs):
            continue
        y = final.outputs[0]
        final.outputs.clear()
        for r in list(xc.outputs) if xc is not x else []:   # float Cast of float: the same tensor
            for j, t in enumerate(r.inputs):
                if t is xc:
                    r.inputs[j] = x
        outside = [r for r in x.outputs if all(r is not i for i in inner)]
        a, b = add.inputs
        add.outputs.clear()
        outs = [y, gs.Variable.empty(), gs.Variable.empty(), x] if outside else [y]
        g.nodes.append(gs.Node("SkipSimplifiedLayerNormalization", name=f"{final.name}_skipsln", domain=MS,
                               inputs=[a, b, gamma], outputs=outs, attrs={"epsilon": eps}))
        done += 1
    if done:
        g.cleanup().toposort()
    return done
