"""Per-tensor Gram matrices X^T·X summed during calibration (GPTQ's Hessian).

For a linear input X, flattened to F [rows, C], the calibration graph also returns the rows
S = F[0::step] (every step-th row), and each batch adds S^T·S [C, C] to a float32 sum in numpy:
H = 2/n · Σ S^T·S is the Hessian of ||X·W − X·Q||² that GPTQ (search/gptq.py) inverts. The rows
come from every calibration token (thinned by `step`, default 4: 4,096 rows over 32 x 512
tokens, above the widest C of SmolLM2, 1,536, so H has full rank), where the sampled rows kept for the searches (every 64th: 256 rows) would leave H of rank 256.
The sums take C² · 4 bytes per tensor (405 MB for SmolLM2's 121 linear inputs). Measured: with
S^T·S computed in the graph (a Gemm output per tensor) the calibration peaked at 2.1 GB, as
onnxruntime returned 405 MB of [C, C] outputs per run; the rows S are 50 MB per 512-token run.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

GRAM_STEP = 4


def add_grams(g: gs.Graph, targets: list[str], step: int = GRAM_STEP) -> list[str]:
    """Append an output S = F[0::step] per target to `g` (after calibrate/collect.add_reductions); names."""
    tensors = g.tensors()
    consts = {k: gs.Constant(f"gp_gram_{k}", np.array([v], np.int64))
              for k, v in (("start", 0), ("end", 2**62), ("axes", 0), ("step", step))}
    outs = []
    for k, t in enumerate(targets):
        flat, rows = gs.Variable(f"gp_gram_flat_{k}"), gs.Variable(f"gp_gram_rows_{k}", np.float32)
        g.nodes.append(gs.Node("Flatten", f"gp_gram_Flatten_{k}", {"axis": -1}, [tensors[t]], [flat]))
        g.nodes.append(gs.Node("Slice", f"gp_gram_Slice_{k}", {}, [flat, consts["start"], consts["end"],
                                                                  consts["axes"], consts["step"]], [rows]))
        outs.append(rows)
    g.outputs.extend(outs)
    return [o.name for o in outs]


def add_gram(stats, t: str, rows: np.ndarray) -> None:
    """Add S^T·S of one batch's rows S [n, C] of tensor t to stats.gram."""
    g = rows.T @ rows
    if t in stats.gram:
        stats.gram[t] += g
    else:
        stats.gram[t] = g.astype(np.float32)
    stats.gram_rows[t] = stats.gram_rows.get(t, 0) + len(rows)
