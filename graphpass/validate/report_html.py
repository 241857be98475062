"""HTML for `graphpass report`: the answer first, then the plots, then every table collapsed.

  headline  perplexity FP32 -> candidate and their ratio, KL(FP32 ‖ candidate), top-1 agreement
            (or cosine for an encoder), latency and size ratios, the layers left in float (not
            quantized, not smoothed) grouped by reason, the accuracy budget's verdict
  plots     per-layer SQNR, α per site, per-channel magnitudes of the worst sites
  tables    <details>, worst rows first: per-layer error by SQNR, sites by the activation
            max/median left after smoothing; accuracy, latency and size; model summary

Every image is a base64 data URI, CSS is inline, no script.
"""
from __future__ import annotations

import base64
import html
import math

CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1180px;
     color:#1d2430;padding:0 1em}
h1{font-size:1.5em;margin-bottom:.2em} h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #d8dde6}
table{border-collapse:collapse;margin:.6em 0;font-variant-numeric:tabular-nums}
th,td{border:1px solid #d8dde6;padding:3px 8px;text-align:right;vertical-align:top}
th{background:#f2f4f8} td.l,th.l{text-align:left}
#headline table{font-size:1.1em} #headline td:last-child{font-weight:600}
#headline ul{margin:.4em 0;padding-left:1.3em}
figure{margin:1em 0} figure img{max-width:100%;height:auto;border:1px solid #e4e7ee}
figcaption{color:#566;font-size:.9em} .note{color:#566;font-size:.9em} .bad{color:#b00020}
details{margin:.5em 0;border:1px solid #e4e7ee;border-radius:4px;padding:.3em .8em}
summary{cursor:pointer;font-weight:600} nav a{margin-right:1em}
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


def _details(did: str, summary: str, content: str) -> str:
    return f'<details id="{did}"><summary>{_e(summary)}</summary>{content}</details>'


# ---------------------------------------------------------------------------- headline
def _accuracy_rows(a: dict) -> list[list[str]]:
    """(metric, FP32, candidate, candidate / FP32) rows of the headline."""
    if not a:
        return [["accuracy", "-", "not measured", ""]]
    if a.get("kind") == "causal-lm":
        pr, pc = a["perplexity_reference"], a["perplexity_candidate"]
        return [["perplexity", _num(pr, "{:.3f}"), _num(pc, "{:.3f}"), _num(pc / pr, "{:.4f}x")],
                ["KL(FP32 ‖ candidate)", "0", _num(a["kl"], "{:.5f}"), ""],
                ["top-1 agreement", "1", _num(a["top1"], "{:.4f}"), ""]]
    return [["cosine, mean", "1", _num(a["cosine_mean"], "{:.6f}"), ""],
            ["cosine, min", "1", _num(a["cosine_min"], "{:.6f}"), ""]]


def _speed_rows(b: dict) -> list[list[str]]:
    rows = [[f"latency {t['shape']}", _num(t["reference_ms"], "{:.2f} ms"), _num(t["candidate_ms"], "{:.2f} ms"),
             _num(t["ratio"], "{:.3f}x")] for t in b.get("latency", [])]
    s = b.get("size", {})
    if s:
        rows.append(["size on disk", f"{s['reference_bytes'] / 1e6:.1f} MB", f"{s['candidate_bytes'] / 1e6:.1f} MB",
                     _num(s["ratio"], "{:.3f}x")])
    return rows


def _by_reason(items: list[tuple[str, str]], modules: dict) -> list[str]:
    """One line per reason: 'reason: n layers (a, b, c, ...)'; a reason naming its layer drops it."""
    groups: dict[str, list[str]] = {}
    for name, why in items:
        groups.setdefault(why.removeprefix(f"{name} "), []).append(modules.get(name, name))
    out = []
    for why, names in sorted(groups.items(), key=lambda g: -len(g[1])):
        shown = ", ".join(names[:4]) + (f", ... ({len(names) - 4} more)" if len(names) > 4 else "")
        out.append(f"{why}: {len(names)} layer{'s' if len(names) != 1 else ''} ({shown})")
    return out


def _layers(n: int) -> str:
    return f"{n} linear layer{'s' if n != 1 else ''}"


def _reasons(items: list[tuple[str, str]], modules: dict) -> str:
    lines = _by_reason(items, modules)
    return ("<ul>" + "".join(f"<li>{_e(x)}</li>" for x in lines) + "</ul>") if lines else ""


def _float_html(rd) -> str:
    """What was kept in float and why: not quantized, not smoothed (nested lists by reason)."""
    q = sum(1 for r in rd.layers if r["quantized"])
    total = len(rd.layers) + len(rd.unmatched)
    items = [f"<li><b>{q} of {_layers(total)} in int8</b>; {len(rd.kept_float)} kept in float"
             + (", by reason:" if rd.kept_float else ".") + _reasons(rd.kept_float, rd.modules) + "</li>"]
    if rd.sites:
        al = [float(s["alpha"]) for s in rd.sites]
        items.append(f"<li><b>{len(rd.sites)} smoothing sites</b> folded, α {min(al):.2f}–{max(al):.2f} "
                     f"(mean {sum(al) / len(al):.2f}); {_layers(len(rd.uncovered))} not smoothed"
                     + (", by reason:" if rd.uncovered else ".") + _reasons(rd.uncovered, rd.modules) + "</li>")
    if rd.budget:
        items.append(f"<li>{_budget_verdict(rd.budget)}</li>")
    return "<ul>" + "".join(items) + "</ul>"


def _headline_html(rd) -> str:
    rows = _accuracy_rows(rd.accuracy) + _speed_rows(rd.bench)
    a = rd.accuracy
    said = [f'accuracy over {a.get("samples", "?")} samples ({a.get("tokens", "?")} tokens) of the --data file'
            if a else "", f'latency: median of interleaved blocks, {rd.bench.get("threads", "?")} threads, '
            "spinning off" if rd.bench.get("latency") else "latency not measured"]
    note = f'<p class="note">{_e("; ".join(x for x in said if x))}</p>'
    return (_table("headline", ["", "FP32", "candidate", "candidate / FP32"], rows)
            + _float_html(rd) + note)


# ---------------------------------------------------------------------------- plots
def _plots_html(rd) -> str:
    imgs = {stem: (cap, png) for stem, cap, png in rd.plots}
    order = ["layer_sqnr", "alpha_per_site"] + [s for s, _, _ in rd.plots if s.startswith("site_")]
    figs = "".join(_img(imgs[s][1], imgs[s][0], s) for s in order if s in imgs)
    return figs or '<p class="note">nothing to plot</p>'


# ---------------------------------------------------------------------------- tables
def _sites_html(rd) -> str:
    m = rd.modules.get
    worst = sorted(rd.sites, key=lambda s: -s["act_ratio_after"])
    rows = [[s["site"], s["kind"], f"{len(s['consumers'])}: " + ", ".join(m(c, c) for c in s["consumers"][:3])
             + (" ..." if len(s["consumers"]) > 3 else ""), _num(float(s["alpha"]), "{:.2f}"),
             f"{_num(s['act_ratio_before'], '{:.1f}')} -> {_num(s['act_ratio_after'], '{:.1f}')}",
             f"{_num(s['w_ratio_before'], '{:.1f}')} -> {_num(s['w_ratio_after'], '{:.1f}')}"]
            for s in worst]
    note = (f'<p class="note">{len(rd.sites)} sites, {_e(rd.sites_note)}; the ratio is max/median of the '
            "per-channel max|x| (activation) or max|w| over the readers' input rows (weight). Largest "
            "activation ratio after smoothing first.</p>")
    return note + _table("sites", ["site", "kind", "readers", "α", "activation max/median", "weight max/median"],
                         rows, left=3)


def _layers_html(rd) -> str:
    q = [r for r in rd.layers if r["quantized"]]
    q.sort(key=lambda r: (r["sqnr_db"] if r["sqnr_db"] is not None else math.inf, r["index"]))
    rows = [[k, r.get("module") or r["name"], _num(r["sqnr_db"], "{:.2f}"), _num(r["rel_l2"], "{:.4f}"),
             _num(r.get("input_sqnr_db"), "{:.2f}"), _num(r.get("layer_sqnr_db"), "{:.2f}")]
            for k, r in enumerate(q, 1)]
    note = (f'<p class="note">{len(q)} quantized layers of {len(rd.layers)} matched by output name'
            + (f", {len(rd.unmatched)} unmatched" if rd.unmatched else "") +
            f", over {rd.debug_samples} samples, lowest output SQNR first. SQNR = 10·log10(Σy² / Σ(ŷ−y)²) at "
            "the layer's output (error of every layer before it included); input = the same at its input; "
            "layer = the layer alone, run in float on the candidate's own input.</p>")
    return note + _table("layers", ["rank", "layer", "SQNR dB", "rel L2", "input dB", "layer dB"], rows, left=2)


def _reasons_html(rd) -> str:
    m = rd.modules.get
    parts = []
    if rd.kept_float:
        parts.append(_table("kept-float", ["kept in float", "reason"], [[m(n, n), why] for n, why in rd.kept_float],
                            left=2))
    if rd.uncovered:
        parts.append(_table("uncovered", ["not smoothed", "reason"], [[m(n, n), why] for n, why in rd.uncovered],
                            left=2))
    return "".join(parts)


def _accuracy_html(rd) -> str:
    a = rd.accuracy
    if not a:
        return '<p class="note">not measured</p>'
    rows = _accuracy_rows(a)
    for name, e in a.get("outputs", {}).items():
        rows.append([f"{name}: max / mean |Δ|", "0", f"{e['max_abs']:.3g} / {e['mean_abs']:.3g}", ""])
    note = (f'<p class="note">{a.get("kind", "")}, {a.get("samples", "?")} samples, '
            f'{a.get("tokens", "?")} tokens</p>')
    return note + _table("accuracy", ["metric", "FP32", "candidate", "ratio"], rows)


def _speed_html(rd) -> str:
    b = rd.bench
    note = (f'<p class="note">median of interleaved blocks, {b.get("threads", "?")} threads, spinning off</p>'
            if b.get("latency") else '<p class="note">latency not measured</p>')
    return note + _table("speed", ["", "FP32", "candidate", "ratio"], _speed_rows(b))


def _budget_verdict(bud: dict) -> str:
    b = bud["budget"]
    limits = ", ".join(x for x in ((f"KL ≤ {b['max_kl']:g}" if b.get("max_kl") is not None else ""),
                                   (f"perplexity +{100 * b['max_ppl_increase']:g}%"
                                    if b.get("max_ppl_increase") is not None else "")) if x)
    verdict = "met" if bud["met"] else '<span class="bad">not met</span>'
    return (f"accuracy budget {_e(limits)} on {bud['held_out_samples']} held-out samples: {verdict}, "
            f"{len(bud['kept_float'])} layers put back in float")


def _budget_html(bud: dict) -> str:
    rows = [[t["float_layers"], _num(t["kl"], "{:.5f}"),
             _num(100 * t["ppl_increase"], "{:+.2f}%") if t["ppl_increase"] is not None else "-",
             "within" if t["met"] else "over"] for t in bud["attempts"]]
    kept = ", ".join(bud.get("kept_float_modules") or bud["kept_float"]) or "none"
    return (f"<p>{_budget_verdict(bud)}: {_e(kept)}.</p>"
            + _table("budget", ["layers in float", "KL", "perplexity", "budget"], rows, left=0))


def _tables_html(rd) -> str:
    q = sum(1 for r in rd.layers if r["quantized"])
    parts = [_details("d-layers", f"Per-layer error: {q} quantized layers, lowest SQNR first", _layers_html(rd)),
             _details("d-sites", f"Smoothing sites: {len(rd.sites)}, largest activation max/median after "
                                 "smoothing first", _sites_html(rd))]
    if rd.kept_float or rd.uncovered:
        parts.append(_details("d-float", f"Layers kept in float ({len(rd.kept_float)}) and not smoothed "
                                         f"({len(rd.uncovered)}), with the reason", _reasons_html(rd)))
    parts += [_details("d-accuracy", "Accuracy, every metric", _accuracy_html(rd)),
              _details("d-speed", "Latency and size", _speed_html(rd))]
    if rd.budget:
        parts.append(_details("d-budget", "Accuracy budget: every attempt", _budget_html(rd.budget)))
    parts.append(_details("d-summary", "Model summary", _table("summary", ["", "FP32", "candidate"], rd.summary)))
    return "".join(parts)


def render(rd) -> str:
    sections = [("headline", "Result", _headline_html(rd)), ("plots", "Plots", _plots_html(rd)),
                ("tables", "Tables", _tables_html(rd))]
    nav = "".join(f'<a href="#{sid}">{_e(t)}</a>' for sid, t, _ in sections) + '<a href="#notes">Notes</a>'
    body = "".join(f'<section id="{sid}"><h2>{_e(t)}</h2>{content}</section>' for sid, t, content in sections)
    notes = "".join(f'<li>{_e(n)}</li>' for n in rd.notes)
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{_e(rd.title)}</title>'
            f"<style>{CSS}</style></head><body><h1>{_e(rd.title)}</h1><nav>{nav}</nav>{body}"
            f'<section id="notes"><h2>Notes</h2><ul>{notes}</ul></section></body></html>\n')
