"""Per-tensor Gram matrices X^T·X, computed inside the calibration graph (GPTQ's Hessian).

For a linear input X, flattened to F [rows, C], the calibration graph also returns
  G = Gemm(S, S, transA=1) = S^T·S   [C, C],   S = F[0::step]   (every step-th row)
and the batches add up: H = 2/n · Σ G is the Hessian of ||X·W − X·Q||² that GPTQ
(search/gptq.py) inverts. The rows come from every calibration token (thinned by `step`, default
4: 4,096 rows over 32 x 512 tokens, above the widest C of SmolLM2, 1,536, so H has full rank),
where the sampled rows kept for the searches (every 64th: 256 rows) would leave H of rank 256.
onnxruntime computes S^T·S with its own threads while the model runs; the sums stay float32
(C² · 4 bytes per tensor: 405 MB for SmolLM2's 121 linear inputs).
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

GRAM_STEP = 4


def add_grams(g: gs.Graph, targets: list[str], step: int = GRAM_STEP) -> list[str]:
    """Append an output S^T·S per target to `g` (after calibrate/collect.add_reductions); names."""
    tensors = g.tensors()
    consts = {k: gs.Constant(f"gp_gram_{k}", np.array([v], np.int64))
              for k, v in (("start", 0), ("end", 2**62), ("axes", 0), ("step", step))}
    outs = []
    for k, t in enumerate(targets):
        flat, rows, out = (gs.Variable(f"gp_gram_{what}_{k}") for what in ("flat", "rows", "out"))
        out.dtype = np.float32
        g.nodes.append(gs.Node("Flatten", f"gp_gram_Flatten_{k}", {"axis": -1}, [tensors[t]], [flat]))
        g.nodes.append(gs.Node("Slice", f"gp_gram_Slice_{k}", {}, [flat, consts["start"], consts["end"],
                                                                  consts["axes"], consts["step"]], [rows]))
        g.nodes.append(gs.Node("Gemm", f"gp_gram_Gemm_{k}", {"transA": 1}, [rows, rows], [out]))
        outs.append(out)
    g.outputs.extend(outs)
    return [o.name for o in outs]


def add_gram(stats, t: str, gram: np.ndarray, rows: int, step: int = GRAM_STEP) -> None:
    """Add one batch's S^T·S of tensor t (from `rows` flattened rows) to stats.gram."""
    n = -(-int(rows) // step)
    if t in stats.gram:
        stats.gram[t] += gram
    else:
        stats.gram[t] = np.array(gram, np.float32)
    stats.gram_rows[t] = stats.gram_rows.get(t, 0) + n
