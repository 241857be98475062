"""onnxruntime sessions configured the same way everywhere (CPU, fixed threads, no spinning)."""
from __future__ import annotations

import os
from pathlib import Path

import onnx
import onnxruntime as ort

from .errors import GraphpassError


def session_options(threads: int = 2, spinning: bool = False,
                    level: ort.GraphOptimizationLevel = ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                    profile: bool = False, prepack: bool = True) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = level
    so.log_severity_level = 3
    # An idle session's spinning threads steal time from the one being measured (FACTS.md).
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    so.enable_profiling = profile
    if not prepack:  # lean mode for streaming runs over large models: no prepacked weight
        so.add_session_config_entry("session.disable_prepacking", "1")   # copies, and no
        so.enable_mem_pattern = False                                      # preplanned arena block
    return so


def make_session(model: str | os.PathLike | onnx.ModelProto, threads: int = 2,
                 **kw) -> ort.InferenceSession:
    """A CPU session from a path (external data allowed) or an in-memory model under 2 GB."""
    so = session_options(threads, **kw)
    try:
        if isinstance(model, onnx.ModelProto):
            return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        return ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])
    except Exception as e:
        name = "model" if isinstance(model, onnx.ModelProto) else Path(model).name
        msg = str(e).strip().splitlines()[0][:240] if str(e).strip() else type(e).__name__
        raise GraphpassError(f"{name}: onnxruntime cannot load it ({msg})") from None
