"""Proof that an exported attention mask holds the causal conjunct GroupQueryAttention applies.

GroupQueryAttention (causal=1) lets query row i of s new tokens see key j iff j <= T - s + i,
T = total length. Adding it changes nothing iff the graph's own boolean mask M [b, 1, s, T]
already implies it: M = Expand(And(..., LessOrEqual(kv, qp), ...)) with
    kv = Range(0, E, 1) along axis 3,   qp = Range(P, _, 1) along axis 2,
    P  = the past length (Shape(past_key_values.*)[2]),   E = P + (length of qp) = P + s.
Then the mask's causal part is j <= P + i = T - s + i, and M ⊆ causal: the two agree.
"""
from __future__ import annotations

import onnx_graphsurgeon as gs

from graphpass.passes.decode_match import NoMatch, expect, producer, scalar, shape_dim, skip


def check_causal(mask, graph_inputs: set[str]) -> None:
    """Raise NoMatch (with the reason) unless `mask` provably implies the causal conjunct."""
    for le in _conjuncts(mask):
        if le.op == "LessOrEqual":
            _check_le(le, graph_inputs)
            return
    raise NoMatch(f"mask '{mask.name}' holds no LessOrEqual(key, query position) conjunct")


def _conjuncts(t) -> list[gs.Node]:
    """Nodes feeding an And-tree (through Expand, Cast and Reshape of the boolean)."""
    out, todo = [], [t]
    while todo:
        n = producer(todo.pop())
        if n is None:
            continue
        if n.op in ("And", "Expand", "Cast", "Reshape"):
            todo.extend(n.inputs[:2] if n.op == "And" else n.inputs[:1])
        else:
            out.append(n)
    return out


def _check_le(le: gs.Node, graph_inputs: set[str]) -> None:
    kv, kv_axis = _range_axis(le.inputs[0])
    qp, q_axis = _range_axis(le.inputs[1])
    if (kv_axis, q_axis) != ((3, 4), (2, 4)):
        raise NoMatch(f"causal conjunct compares axes {kv_axis} and {q_axis}, expected key axis 3, query axis 2")
    if scalar(kv.inputs[0]) != 0 or scalar(kv.inputs[2]) != 1 or scalar(qp.inputs[2]) != 1:
        raise NoMatch("causal conjunct: key range does not start at 0 or a range steps by more than 1")
    past = _past_length(qp.inputs[0], graph_inputs)
    end = expect(skip(kv.inputs[1], "Cast"), "Add")
    terms = [skip(t, "Cast") for t in end.inputs]
    hit = [i for i, x in enumerate(terms) if x is past]
    if len(terms) != 2 or not hit:
        raise NoMatch("causal conjunct: key range does not end at the past length plus the query count")
    rest = shape_dim(terms[1 - hit[0]])
    if rest is None or rest[0] is not qp.outputs[0] or rest[1] != 0:
        raise NoMatch("causal conjunct: key range does not end at the past length plus the query count")


def _range_axis(t) -> tuple[gs.Node, tuple[int, int]]:
    """The Range behind a chain of Unsqueezes, and (axis it lands on, final rank)."""
    chain = []
    while (n := producer(t)) is not None and n.op == "Unsqueeze":
        chain.append(n)
        t = n.inputs[0]
    rng = expect(t, "Range")
    axis, rank = 0, 1
    for n in reversed(chain):
        axes = n.inputs[1] if len(n.inputs) > 1 else None
        vals = scalar(axes) if axes is not None else None
        if vals is None:
            raise NoMatch("causal conjunct: an Unsqueeze without one constant axis")
        rank += 1
        a = int(vals) % rank
        axis += 1 if a <= axis else 0
    return rng, (axis, rank)


def _past_length(t, graph_inputs: set[str]):
    """`t` (behind Casts) must be Gather(Shape(a past input), 2); returns that Gather's output."""
    base = skip(t, "Cast")
    sd = shape_dim(base)
    if sd is None or sd[1] != 2 or sd[0].name not in graph_inputs:
        raise NoMatch("causal conjunct: the query positions do not start at the past length")
    return base
