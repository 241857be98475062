"""graph/io.save_graph on a graph whose If branches each hold their own initializer of one name
(legal: sibling scopes). Each branch keeps its own values: the saved model computes what the
source computed, inline and with external data, and passes the checker (with external data, a
branch's own tensor in the data file: the --decode-route prefill body's local DequantizeLinear
scale of a model past 1 GB)."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from graphpass.graph.gs_io import import_graph
from graphpass.graph.io import save_graph
from graphpass.graph.runtime import make_session


def _branch(tag: str, value: float) -> onnx.GraphProto:
    w = nh.from_array(np.full((16, 32), value, np.float32), "w")     # 2 kB: exported as a stub
    return h.make_graph([h.make_node("MatMul", ["x", "w"], [f"y_{tag}"])], tag, [],
                        [h.make_tensor_value_info(f"y_{tag}", T.FLOAT, [1, 32])], [w])


@pytest.mark.parametrize("external", [False, True])
def test_sibling_branches_keep_their_own_initializer_of_one_name(tmp_path, external):
    g = h.make_graph([h.make_node("If", ["c"], ["y"], then_branch=_branch("then", 1.0),
                                  else_branch=_branch("else", 2.0))], "g",
                     [h.make_tensor_value_info("c", T.BOOL, []), h.make_tensor_value_info("x", T.FLOAT, [1, 16])],
                     [h.make_tensor_value_info("y", T.FLOAT, [1, 32])])
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 18)], ir_version=9)
    onnx.checker.check_model(m)
    p = save_graph(import_graph(m), tmp_path / "m.onnx", external=external, check=True)
    x = np.ones((1, 16), np.float32)
    for cond in (True, False):
        feeds = {"c": np.array(cond), "x": x}
        np.testing.assert_array_equal(make_session(str(p)).run(None, feeds)[0], make_session(m).run(None, feeds)[0])
