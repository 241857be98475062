"""Small structural helpers shared by the decode rewrites, on onnx-graphsurgeon graphs.

A rule walks producers with `expect` and reads constants with `const`; when the walk leaves the
pattern it raises NoMatch with the reason, which the pass reports ("layer 3: ... is a Gather").
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs


class NoMatch(Exception):
    """The pattern does not hold here; the message says why."""


def producer(t) -> gs.Node | None:
    return t.inputs[0] if isinstance(t, gs.Variable) and t.inputs else None


def expect(t, *ops: str) -> gs.Node:
    """The node that produces `t`, which must be one of `ops`."""
    n = producer(t)
    if n is None or n.op not in ops:
        got = n.op if n is not None else ("a constant" if isinstance(t, gs.Constant) else "a graph input")
        raise NoMatch(f"'{t.name}' comes from {got}, expected {'/'.join(ops)}")
    return n


def skip(t, *ops: str):
    """Walk back through nodes of the given ops (e.g. Cast) to the first other tensor."""
    n = producer(t)
    while n is not None and n.op in ops:
        t = n.inputs[0]
        n = producer(t)
    return t


def const(t, limit: int = 64) -> np.ndarray | None:
    """The value of a small constant tensor (initializer or Constant node), else None.

    Larger ones are not read: an external weight would need its base directory (FACTS.md)."""
    if isinstance(t, gs.Constant):
        return np.asarray(t.values) if int(np.prod(t.shape or ())) <= limit else None
    n = producer(t)
    if n is not None and n.op == "Constant" and isinstance(n.attrs.get("value"), gs.Constant):
        return np.asarray(n.attrs["value"].values)
    return None


def scalar(t) -> float | None:
    v = const(t)
    return float(v.reshape(-1)[0]) if v is not None and v.size == 1 else None


def readers(t) -> list[gs.Node]:
    return list(t.outputs)


def only_reader(t, op: str) -> gs.Node:
    r = readers(t)
    if len(r) != 1 or r[0].op != op:
        raise NoMatch(f"'{t.name}' is read by {[n.op for n in r]}, expected one {op}")
    return r[0]


def other(node: gs.Node, t) -> gs.Variable:
    """The input of a two-input node that is not `t`."""
    a, b = node.inputs[0], node.inputs[1]
    return b if a is t else a


def shape_dim(t) -> tuple[object, int] | None:
    """(X, i) when `t` is Gather(Shape(X), i) (optionally behind Unsqueeze/Cast), else None."""
    t = skip(t, "Unsqueeze", "Cast", "Squeeze")
    n = producer(t)
    if n is None or n.op != "Gather" or int(n.attrs.get("axis", 0)) != 0:
        return None
    sh, idx = producer(n.inputs[0]), scalar(n.inputs[1])
    if sh is None or sh.op != "Shape" or idx is None or sh.attrs.get("start", 0) or "end" in sh.attrs:
        return None
    return sh.inputs[0], int(idx)


def static_dim(t, axis: int) -> int | None:
    """A dimension of a tensor known as a number from the graph's declared shapes."""
    shape = getattr(t, "shape", None)
    if shape is None or axis >= len(shape):
        return None
    d = shape[axis]
    return int(d) if isinstance(d, (int, np.integer)) and d >= 0 else None
