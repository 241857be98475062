"""Per-channel magnitude plots (SmoothQuant paper, Figure 4): activation and weight, before/after."""
from __future__ import annotations

import io
import os

import numpy as np


def plot_site(site_name: str, act_max: np.ndarray, w_max: np.ndarray, s: np.ndarray,
              path: str | os.PathLike | None = None) -> bytes:
    """Two rows (activation max|X_j|, weight max|W_j|) x two columns (before, after). PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(2, 2, figsize=(11, 5.5), sharex=True)
    panels = [(act_max, act_max / s, "activation max|X_j|", "tab:red"),
              (w_max, w_max * s, "weight max|W_j|", "tab:blue")]
    for r, (before, after, what, color) in enumerate(panels):
        top = max(before.max(), after.max()) * 1.05
        for col, (v, when) in enumerate(((before, "before"), (after, "after smoothing"))):
            a = ax[r, col]
            a.stairs(v, np.arange(v.size + 1) - 0.5, fill=True, color=color)   # one path, not C bars
            a.set_ylim(0, top)
            med = np.median(v)
            ratio = v.max() / med if med > 0 else float("inf")
            a.set_title(f"{what}, {when}  (max/median {ratio:.1f})", fontsize=9)
            if r == 1:
                a.set_xlabel("channel j")
    fig.suptitle(site_name, fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    png = buf.getvalue()
    if path is not None:
        from graphpass.graph.io import write_bytes

        write_bytes(path, png)
    return png
