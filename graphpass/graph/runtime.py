"""onnxruntime sessions configured the same way everywhere (CPU, fixed threads, no spinning)."""
from __future__ import annotations

import os
import re
from pathlib import Path

import onnx
import onnxruntime as ort

from graphpass.errors import GraphpassError


def session_options(threads: int = 2, spinning: bool = False,
                    level: ort.GraphOptimizationLevel = ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                    profile: bool = False, prepack: bool = True, arena: bool = True,
                    in_order: bool = False) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = level
    so.log_severity_level = 4   # errors reach the user as one line (GraphpassError), not as logs
    # An idle session's spinning threads steal time from the one being measured (FACTS.md).
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    so.enable_profiling = profile
    # Without the arena a freed output goes back to the OS at once; with it, a batch of logits
    # (1 GB at 2 x 512 tokens x 262k vocab) may be kept and a second one allocated beside it.
    so.enable_cpu_mem_arena = arena
    if in_order:     # ready nodes run in the model's node order (default: a depth-first order from the outputs)
        so.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    if not prepack:  # lean mode for streaming runs over large models: no prepacked weight
        so.add_session_config_entry("session.disable_prepacking", "1")   # copies, and no
        so.enable_mem_pattern = False                                      # preplanned arena block
    return so


_ORT_ERRORS = tuple(getattr(ort.capi.onnxruntime_pybind11_state, n) for n in
                    ("Fail", "InvalidArgument", "RuntimeException", "NotImplemented", "InvalidGraph",
                     "EPFail") if hasattr(ort.capi.onnxruntime_pybind11_state, n))


class Session(ort.InferenceSession):
    """An InferenceSession whose run() failures (a token id past the embedding table, a sequence
    longer than the position table, ...) are one-line GraphpassErrors."""

    def run(self, output_names, input_feed, run_options=None):
        try:
            return super().run(output_names, input_feed, run_options)
        except _ORT_ERRORS as e:
            raise GraphpassError(f"onnxruntime failed on these inputs ({_message(e)})") from None


def _message(e: BaseException) -> str:
    s = str(e).strip()
    s = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", s.splitlines()[0] if s else "")
    s = s.replace("Non-zero status code returned while running ", "")
    return s[:240] or type(e).__name__


def make_session(model: str | os.PathLike | onnx.ModelProto, threads: int = 2,
                 external_dir: str | None = None, **kw) -> Session:
    """A CPU session from a path (external data allowed) or an in-memory model under 2 GB
    (whose external data, if any, is read from `external_dir`)."""
    so = session_options(threads, **kw)
    if external_dir is not None:
        so.add_session_config_entry("session.model_external_initializers_file_folder_path", external_dir)
    try:
        if isinstance(model, onnx.ModelProto):
            return Session(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        return Session(str(model), so, providers=["CPUExecutionProvider"])
    except Exception as e:
        name = "model" if isinstance(model, onnx.ModelProto) else Path(model).name
        raise GraphpassError(f"{name}: onnxruntime cannot load it ({_message(e)})") from None


def fixed_mmap_threshold(nbytes: int = 1 << 17) -> None:
    """glibc raises its mmap threshold each time a large block is freed, after which blocks of
    attention-score size come from the heap and are not given back: on SmolLM2 that held ~1 GB
    of freed activations at 1x512 (debug), and let eval grow by ~50 MB over 8 batches of
    SmolLM2-sized logits. A fixed threshold keeps large blocks mmapped (freed at once)."""
    libc = glibc()
    if libc is not None:
        libc.mallopt(-3, nbytes)    # M_MMAP_THRESHOLD


def glibc():
    """glibc through ctypes (mallopt, malloc_trim), or None (another platform or C library)."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
