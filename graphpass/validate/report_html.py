"""HTML and charts for `graphpass report`: tables from plain values, PNG charts from matplotlib,
every image a base64 data URI, CSS inline, no script."""
from __future__ import annotations

import base64
import html
import io
import math

import numpy as np

CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1180px;
     color:#1d2430;padding:0 1em}
h1{font-size:1.5em;margin-bottom:.2em} h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #d8dde6}
table{border-collapse:collapse;margin:.6em 0;font-variant-numeric:tabular-nums}
th,td{border:1px solid #d8dde6;padding:3px 8px;text-align:right;vertical-align:top}
th{background:#f2f4f8} td.l,th.l{text-align:left}
figure{margin:1em 0} figure img{max-width:100%;height:auto;border:1px solid #e4e7ee}
figcaption{color:#566;font-size:.9em} .note{color:#566;font-size:.9em} .bad{color:#b00020}
nav a{margin-right:1em}
"""


def _e(v) -> str:
    return html.escape(str(v), quote=True)


def _num(v, fmt: str = "{:.3f}") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float) and math.isinf(v):
        return "inf"
    return fmt.format(v)


def _table(tid: str, head: list[str], rows: list[list], left: int = 1) -> str:
    """A table; the first `left` columns are text (left-aligned)."""
    th = "".join(f'<th class="{"l" if k < left else ""}">{_e(h)}</th>' for k, h in enumerate(head))
    body = "".join("<tr>" + "".join(f'<td class="{"l" if k < left else ""}">{_e(c)}</td>'
                                    for k, c in enumerate(r)) + "</tr>" for r in rows)
    return f'<table id="{tid}"><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>'


def _img(png: bytes, caption: str, stem: str) -> str:
    b64 = base64.b64encode(png).decode()
    return (f'<figure><img id="img-{_e(stem)}" src="data:image/png;base64,{b64}" alt="{_e(caption)}">'
            f"<figcaption>{_e(caption)} ({_e(stem)}.png)</figcaption></figure>")


# ---------------------------------------------------------------------------- charts
def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def charts(rd) -> list[tuple[str, str, bytes]]:
    import matplotlib

    matplotlib.use("Agg")
    out = []
    q = [r for r in rd.layers if r["quantized"]]
    if q:
        out.append(("layer_sqnr", f"per-layer SQNR of the {len(q)} quantized layers, graph order "
                                  f"({rd.debug_samples} samples)", _sqnr_chart(q)))
    if rd.sites:
        out.append(("alpha_per_site", f"α per smoothing site ({len(rd.sites)} sites)", _alpha_chart(rd.sites)))
    return out


def _sqnr_chart(q: list[dict]) -> bytes:
    import matplotlib.pyplot as plt

    x = np.arange(len(q))
    out = np.array([r["sqnr_db"] if r["sqnr_db"] is not None else np.nan for r in q], float)
    loc = np.array([r.get("layer_sqnr_db") if r.get("layer_sqnr_db") is not None else np.nan for r in q], float)
    fig, ax = plt.subplots(figsize=(11, 4))
    ax.bar(x, np.nan_to_num(out, nan=0.0), width=0.9, color="tab:blue", label="SQNR at the layer's output")
    if np.isfinite(loc).any():
        ax.plot(x, loc, ".", color="tab:orange", markersize=4, label="SQNR of the layer alone")
    worst = np.argsort(np.nan_to_num(out, nan=np.inf))[:5]
    for k in worst:
        ax.annotate(q[k].get("module") or q[k]["name"], (k, out[k]), textcoords="offset points",
                    xytext=(0, -12), ha="center", fontsize=7, color="tab:red", rotation=90, va="top")
    ax.set_xlabel("quantized linear layer (graph order)")
    ax.set_ylabel("dB (higher is better)")
    ax.legend(loc="upper right", fontsize=8)
    ax.set_xlim(-1, len(q))
    return _png(fig)


def _alpha_chart(sites: list[dict]) -> bytes:
    import matplotlib.pyplot as plt

    kinds = sorted({s["kind"] for s in sites})
    colors = dict(zip(kinds, plt.get_cmap("tab10").colors))
    fig, ax = plt.subplots(figsize=(11, 3))
    for k, s in enumerate(sites):
        ax.bar(k, float(s["alpha"]), width=0.85, color=colors[s["kind"]])
    for kind in kinds:
        ax.bar([], [], color=colors[kind], label=kind)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("smoothing site (graph order)")
    ax.set_ylabel("α")
    ax.legend(loc="upper right", fontsize=8, ncol=len(kinds))
    return _png(fig)


# ---------------------------------------------------------------------------- page
def _sites_html(rd) -> str:
    m = rd.modules.get
    rows = [[s["site"], s["kind"], f"{len(s['consumers'])}: " + ", ".join(m(c, c) for c in s["consumers"][:3])
             + (" ..." if len(s["consumers"]) > 3 else ""), _num(float(s["alpha"]), "{:.2f}"),
             f"{_num(s['act_ratio_before'], '{:.1f}')} -> {_num(s['act_ratio_after'], '{:.1f}')}",
             f"{_num(s['w_ratio_before'], '{:.1f}')} -> {_num(s['w_ratio_after'], '{:.1f}')}"]
            for s in rd.sites]
    parts = [f'<p class="note">{len(rd.sites)} sites, {_e(rd.sites_note)}; the ratio is max/median of the '
             "per-channel max|x| (activation) or max|w| over the readers' input rows (weight).</p>",
             _table("sites", ["site", "kind", "readers", "α", "activation max/median", "weight max/median"],
                    rows, left=3)]
    if rd.uncovered:
        parts.append("<h3>Linear layers not covered by a site</h3>")
        parts.append(_table("uncovered", ["layer", "reason"], [[m(n, n), why] for n, why in rd.uncovered], left=2))
    if rd.kept_float:
        parts.append("<h3>Linear layers kept in float</h3>")
        parts.append(_table("kept-float", ["layer", "reason"], [[m(n, n), why] for n, why in rd.kept_float],
                            left=2))
    return "".join(parts)


def _layers_html(rd) -> str:
    q = [r for r in rd.layers if r["quantized"]]
    q.sort(key=lambda r: (r["sqnr_db"] if r["sqnr_db"] is not None else math.inf, r["index"]))
    rows = [[k, r.get("module") or r["name"], _num(r["sqnr_db"], "{:.2f}"), _num(r["rel_l2"], "{:.4f}"),
             _num(r.get("input_sqnr_db"), "{:.2f}"), _num(r.get("layer_sqnr_db"), "{:.2f}")]
            for k, r in enumerate(q[:12], 1)]
    note = (f'<p class="note">{len(q)} quantized layers of {len(rd.layers)} matched by output name'
            + (f", {len(rd.unmatched)} unmatched" if rd.unmatched else "") +
            f", over {rd.debug_samples} samples. SQNR = 10·log10(Σy² / Σ(ŷ−y)²) at the layer's output "
            "(error of every layer before it included); input = the same at its input; layer = the "
            "layer alone, run in float on the candidate's own input. Worst 12 by output SQNR:</p>")
    return note + _table("layers", ["rank", "layer", "SQNR dB", "rel L2", "input dB", "layer dB"], rows, left=2)


def _accuracy_html(rd) -> str:
    a = rd.accuracy
    if not a:
        return '<p class="note">not measured</p>'
    if a.get("kind") == "causal-lm":
        pr, pc = a["perplexity_reference"], a["perplexity_candidate"]
        rows = [["perplexity", _num(pr, "{:.3f}"), _num(pc, "{:.3f}"), _num(pc / pr, "{:.4f}x")],
                ["KL(FP32 ‖ candidate)", "0", _num(a["kl"], "{:.5f}"), ""],
                ["top-1 agreement", "1", _num(a["top1"], "{:.4f}"), ""]]
    else:
        rows = [["cosine, mean", "1", _num(a["cosine_mean"], "{:.6f}"), ""],
                ["cosine, min", "1", _num(a["cosine_min"], "{:.6f}"), ""]]
    for name, e in a.get("outputs", {}).items():
        rows.append([f"{name}: max / mean |Δ|", "0", f"{e['max_abs']:.3g} / {e['mean_abs']:.3g}", ""])
    note = (f'<p class="note">{a.get("kind", "")}, {a.get("samples", "?")} samples, '
            f'{a.get("tokens", "?")} tokens</p>')
    return note + _table("accuracy", ["metric", "FP32", "candidate", "ratio"], rows)


def _speed_html(rd) -> str:
    b = rd.bench
    rows = [[f"latency {t['shape']}", _num(t["reference_ms"], "{:.2f} ms"), _num(t["candidate_ms"], "{:.2f} ms"),
             _num(t["ratio"], "{:.3f}x")] for t in b.get("latency", [])]
    s = b.get("size", {})
    if s:
        rows.append(["size on disk", f"{s['reference_bytes'] / 1e6:.1f} MB",
                     f"{s['candidate_bytes'] / 1e6:.1f} MB",
                     _num(s["ratio"], "{:.3f}x")])
    note = (f'<p class="note">median of interleaved blocks, {b.get("threads", "?")} threads, spinning off</p>'
            if b.get("latency") else '<p class="note">latency not measured</p>')
    return note + _table("speed", ["", "FP32", "candidate", "ratio"], rows)


def _budget_html(bud: dict) -> str:
    b = bud["budget"]
    limits = ", ".join(x for x in ((f"KL ≤ {b['max_kl']:g}" if b.get("max_kl") is not None else ""),
                                   (f"perplexity +{100 * b['max_ppl_increase']:g}%"
                                    if b.get("max_ppl_increase") is not None else "")) if x)
    rows = [[t["float_layers"], _num(t["kl"], "{:.5f}"),
             _num(100 * t["ppl_increase"], "{:+.2f}%") if t["ppl_increase"] is not None else "-",
             "within" if t["met"] else "over"] for t in bud["attempts"]]
    kept = ", ".join(bud.get("kept_float_modules") or bud["kept_float"]) or "none"
    verdict = "met" if bud["met"] else '<span class="bad">not met</span>'
    return (f"<p>Budget {_e(limits)} on {bud['held_out_samples']} held-out samples: {verdict}. "
            f"Kept in float ({len(bud['kept_float'])}): {_e(kept)}.</p>"
            + _table("budget", ["layers in float", "KL", "perplexity", "budget"], rows, left=0))


def render(rd) -> str:
    imgs = {stem: (cap, png) for stem, cap, png in rd.plots}
    site_imgs = "".join(_img(png, cap, stem) for stem, (cap, png) in imgs.items() if stem.startswith("site_"))
    chart = lambda stem: _img(imgs[stem][1], imgs[stem][0], stem) if stem in imgs else ""  # noqa: E731
    sections = [("summary", "Model summary", _table("summary", ["", "FP32", "candidate"], rd.summary, left=1)),
                ("sites", "Smoothing sites and folding decisions", _sites_html(rd)),
                ("plots", "Per-channel magnitudes before / after smoothing (strongest outliers)",
                 site_imgs or '<p class="note">no site to plot</p>'),
                ("alpha", "α per site", chart("alpha_per_site") or '<p class="note">no smoothing site</p>'),
                ("errors", "Per-layer error", chart("layer_sqnr") + _layers_html(rd)),
                ("accuracy", "Accuracy", _accuracy_html(rd)),
                ("speed", "Latency and size", _speed_html(rd))]
    if rd.budget:
        sections.append(("budget-section", "Accuracy budget", _budget_html(rd.budget)))
    nav = "".join(f'<a href="#{sid}">{_e(t)}</a>' for sid, t, _ in sections)
    body = "".join(f'<section id="{sid}"><h2>{_e(t)}</h2>{content}</section>' for sid, t, content in sections)
    notes = "".join(f'<li>{_e(n)}</li>' for n in rd.notes)
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{_e(rd.title)}</title>'
            f"<style>{CSS}</style></head><body><h1>{_e(rd.title)}</h1><nav>{nav}</nav>{body}"
            f'<section id="notes"><h2>Notes</h2><ul>{notes}</ul></section></body></html>\n')
