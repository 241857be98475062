"""`graphpass report`: one self-contained HTML page on a rewritten graph against its FP32 reference.

The page leads with the answer: perplexity FP32 -> candidate and their ratio, KL(FP32 ‖ candidate),
top-1 agreement (or cosine), latency and size ratios, and the layers left in float (not quantized,
not smoothed) with the reasons. Then the plots: per-layer SQNR (graphpass.debug), α per site,
per-channel magnitudes of the sites with the strongest outliers. Then every table, collapsed,
worst rows first. Images are PNG data URIs (also written to <name>_files/), CSS is inline, no
script: the file renders anywhere, offline.

Sources, each reused when given, else computed on --data: the `quantize --report` JSON (sites,
α, layers kept in float, budget), a stats file (per-channel ranges for the plots; without one a
few samples of --data are calibrated), eval / bench / debug JSON.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from graphpass.errors import GraphpassError

PLOT_SAMPLES = 4          # samples of --data calibrated for the plots when no --stats is given


@dataclass(frozen=True)
class ReportInputs:
    reference: str
    candidate: str
    data: str
    stats: str | None = None
    quantize_report: str | None = None
    eval_json: str | None = None
    bench_json: str | None = None
    debug_json: str | None = None
    sites: int = 4
    bench_seconds: float = 3.0
    threads: int = 2
    title: str | None = None
    progress: bool = True


@dataclass
class ReportData:
    """Everything the page shows, as plain values (graphpass.report_html renders it)."""
    title: str
    summary: list[tuple[str, str, str]] = field(default_factory=list)     # (what, FP32, candidate)
    sites: list[dict] = field(default_factory=list)
    sites_note: str = ""
    uncovered: list[tuple[str, str]] = field(default_factory=list)
    kept_float: list[tuple[str, str]] = field(default_factory=list)
    modules: dict[str, str] = field(default_factory=dict)                 # layer name -> module path
    plots: list[tuple[str, str, bytes]] = field(default_factory=list)     # (file stem, caption, png)
    layers: list[dict] = field(default_factory=list)                      # debug rows, graph order
    debug_samples: int = 0
    unmatched: list[str] = field(default_factory=list)
    accuracy: dict = field(default_factory=dict)
    bench: dict = field(default_factory=dict)
    budget: dict | None = None
    notes: list[str] = field(default_factory=list)


# the keys the page reads from each given JSON, and the command that writes it
_GIVEN = {"quantize_report": ("graphpass quantize --report", ("kept_float",)),
          "eval_json": ("graphpass eval --json", ("kind", "samples")),
          "bench_json": ("graphpass bench --json (without --decode)", ("latency", "size")),
          "debug_json": ("graphpass debug --json", ("layers", "samples"))}
_EVAL_KEYS = {"causal-lm": ("perplexity_reference", "perplexity_candidate", "kl", "top1"),
              "encoder": ("cosine_mean", "cosine_min")}


def _read_json(path: str | None, what: str) -> dict | None:
    """The JSON given for `what` (a key of _GIVEN), refused unless it holds what the page reads."""
    if not path:
        return None
    writer, keys = _GIVEN[what]
    try:
        res = json.loads(Path(path).read_text())
    except OSError as e:
        raise GraphpassError(f"{path}: cannot read {what.replace('_', ' ')} ({e.strerror})") from None
    except ValueError:
        raise GraphpassError(f"{path}: not a JSON file ({what.replace('_', ' ')})") from None
    if isinstance(res, dict) and what == "eval_json":
        keys += _EVAL_KEYS.get(res.get("kind"), _EVAL_KEYS["causal-lm"])
    missing = [k for k in keys if not isinstance(res, dict) or k not in res]
    if missing:
        raise GraphpassError(f"{path}: not the output of {writer} (no {', '.join(missing)})")
    return res


def gather(inp: ReportInputs) -> ReportData:
    from graphpass.calibrate.data import check_data, load_data
    from graphpass.graph.io import load_model

    ref_m = load_model(inp.reference, load_weights=False)
    if not Path(inp.candidate).is_file():
        raise GraphpassError(f"{inp.candidate}: no such file")
    data = load_data(inp.data)
    check_data(data, ref_m, inp.data)
    given = {k: _read_json(getattr(inp, k), k) for k in _GIVEN}     # all read before any work
    rd = ReportData(inp.title or f"{Path(inp.candidate).name} against {Path(inp.reference).name}")
    _debug(rd, inp, data, given["debug_json"])
    _summary(rd, inp, ref_m)
    _sites(rd, inp, ref_m, data, given["quantize_report"])
    _accuracy(rd, inp, data, given["eval_json"])
    _bench(rd, inp, given["bench_json"])
    rd.budget = (given["quantize_report"] or {}).get("budget")
    return rd


def _summary(rd: ReportData, inp: ReportInputs, ref_m) -> None:
    from collections import Counter

    import onnx

    from graphpass.graph.io import model_size

    cand_m = onnx.load(str(inp.candidate), load_external_data=False)
    q = sum(1 for r in rd.layers if r["quantized"])
    ops = Counter(n.op_type for n in cand_m.graph.node)
    int_ops = sum(v for k, v in ops.items() if k in ("MatMulIntegerToFloat", "MatMulInteger",
                                                      "DynamicQuantizeMatMul", "QuantizeLinear"))
    rd.summary = [("file", str(inp.reference), str(inp.candidate)),
                  ("nodes", str(len(ref_m.graph.node)), str(len(cand_m.graph.node))),
                  ("linear layers (matched by output name)", str(len(rd.layers) + len(rd.unmatched)),
                   f"{q} in int8, {len(rd.layers) - q} in float"),
                  ("integer / quantize nodes", "0", str(int_ops)),
                  ("size on disk (external data included)", f"{model_size(inp.reference) / 1e6:.1f} MB",
                   f"{model_size(inp.candidate) / 1e6:.1f} MB")]
    top = ", ".join(f"{k} {v}" for k, v in ops.most_common(6))
    rd.notes.append(f"most frequent candidate ops: {top}")


def _debug(rd: ReportData, inp: ReportInputs, data, res: dict | None) -> None:
    if res is None:
        from graphpass.validate.debug import debug

        d = debug(inp.reference, inp.candidate, data, threads=inp.threads, progress=inp.progress)
        res = d.to_json()
    rd.layers, rd.debug_samples, rd.unmatched = res["layers"], res["samples"], res.get("unmatched", [])
    if res.get("kv_cache"):
        rd.notes.append(f"per-layer errors: {res['kv_cache']}")


def _accuracy(rd: ReportData, inp: ReportInputs, data, given: dict | None) -> None:
    rd.accuracy = given or {}
    if not rd.accuracy:
        from graphpass.validate.evaluate import evaluate

        rd.accuracy = evaluate(inp.candidate, inp.reference, data, threads=inp.threads,
                               progress=inp.progress)


def _bench(rd: ReportData, inp: ReportInputs, given: dict | None) -> None:
    rd.bench = given or {}
    if not rd.bench and inp.bench_seconds > 0:
        from graphpass.validate.bench import bench

        try:
            rd.bench = bench(inp.candidate, inp.reference, [(1, 512)], threads=inp.threads,
                             seconds=inp.bench_seconds, progress=inp.progress)
        except GraphpassError as e:
            rd.notes.append(f"latency not measured: {e}")
    if not rd.bench:
        from graphpass.graph.io import model_size

        ref, cand = model_size(inp.reference), model_size(inp.candidate)
        rd.bench = {"latency": [], "size": {"reference_bytes": ref, "candidate_bytes": cand,
                                           "ratio": cand / ref}}


def _sites(rd: ReportData, inp: ReportInputs, ref_m, data, qrep: dict | None) -> None:
    """Site rows (from the quantize report, else recomputed) and plots of the worst sites."""
    from graphpass.passes.smooth import site_scales, weight_absmax
    from graphpass.match.sites import analyze

    from graphpass.validate.debug_graph import module_path

    an = analyze(ref_m, str(Path(inp.reference).parent.resolve()))
    rd.modules = {lin.name: m for lin in an.linears if (m := module_path(lin.node))}
    rd.uncovered = list(an.uncovered)
    alphas = (qrep or {}).get("alphas", {})
    rd.kept_float = _kept_float(qrep, rd.layers)
    stats = _stats(rd, inp, data, an) if an.sites else None
    rows = (qrep or {}).get("smoothing") or []
    if rows:
        source = f"in {Path(inp.quantize_report).name}"
        rd.sites_note = f"from {Path(inp.quantize_report).name}"
    else:
        default = 0.5
        source = f"on {'the stats file' if inp.stats else 'a few samples of --data'}"
        rd.sites_note = f"recomputed {source} at α {default} where the quantize report gives none"
        for s in an.sites:
            act = stats.absmax(s.act)
            a = float(alphas.get(s.name, default))
            sc = site_scales(s, an.consts, act, a)
            w = weight_absmax(s.consumers, an.consts)
            rows.append(dict(site=s.name, kind=s.kind, consumers=[lin.name for lin in s.consumers], alpha=a,
                             act_ratio_before=_ratio(act), act_ratio_after=_ratio(act / sc),
                             w_ratio_before=_ratio(w), w_ratio_after=_ratio(w * sc)))
    rd.sites = rows
    if stats is not None:
        _site_plots(rd, inp, an, stats, source)


def _kept_float(qrep: dict | None, layers: list[dict]) -> list[tuple[str, str]]:
    """(layer, why) of every linear layer left in float; the budget's choices say so."""
    if not qrep:
        return [(r["name"], "in float in the candidate (the reason is in the quantize report: "
                            "give --quantize-report)") for r in layers if not r["quantized"]]
    by_budget = set((qrep.get("budget") or {}).get("kept_float", []))
    return [(name, "put back in float by the accuracy budget" if name in by_budget else why)
            for name, why in qrep.get("kept_float", [])]


def _site_plots(rd: ReportData, inp: ReportInputs, an, stats, source: str) -> None:
    """Per-channel plots of the sites with the largest activation max/median before smoothing."""
    from graphpass.passes.smooth import site_scales, weight_absmax
    from graphpass.validate.plots import plot_site

    by_name = {s.name: s for s in an.sites}
    worst = sorted((r for r in rd.sites if r["site"] in by_name), key=lambda r: -r["act_ratio_before"])
    for r in worst[: inp.sites]:
        s = by_name[r["site"]]
        act = stats.absmax(s.act)
        png = plot_site(s.name, act, weight_absmax(s.consumers, an.consts),
                        site_scales(s, an.consts, act, float(r["alpha"])))
        caption = (f"{s.name} ({s.kind}, α {float(r['alpha']):.2f}): activation max/median "
                   f"{r['act_ratio_before']:.1f} -> {r['act_ratio_after']:.1f} {source}"
                   + ("" if inp.stats or source.startswith("on ") else "; the panels: a few samples of --data"))
        rd.plots.append((f"site_{len(rd.plots) + 1}", caption, png))


def _ratio(v) -> float:
    """max / median of per-channel magnitudes (the outlier ratio of the smoothing report)."""
    med = float(np.median(v))
    return float(np.max(v) / med) if med > 0 else float("inf")


def _stats(rd: ReportData, inp: ReportInputs, data, an):
    from graphpass.calibrate.stats import Stats

    need = {s.act: s.consumers[0].shape(an.consts)[0] for s in an.sites}
    if inp.stats:
        st = Stats.load(inp.stats)
        st.require(need, "stats")
        return st
    from graphpass.calibrate.collect import calibrate

    few = {k: v[:PLOT_SAMPLES] for k, v in data.items()}
    rd.notes.append(f"per-channel ranges from the first {len(next(iter(few.values())))} samples of "
                    f"{Path(inp.data).name} (no --stats given): the 'after' plots use the scales those "
                    "ranges give at the reported α")
    return calibrate(inp.reference, few, threads=inp.threads, progress=False, targets=need)


def write_report(inp: ReportInputs, output: str | os.PathLike) -> Path:
    from graphpass.graph.io import write_bytes, write_text
    from graphpass.validate.plots import charts
    from graphpass.validate.report_html import render

    out = Path(output)
    if not out.resolve().parent.is_dir():
        raise GraphpassError(f"{out.parent}: output folder does not exist")
    rd = gather(inp)
    rd.plots += charts(rd)
    files = out.with_name(out.stem + "_files")
    files.mkdir(exist_ok=True)
    for old in files.glob("site_*.png"):           # plots of an earlier, longer report
        old.unlink()
    for stem, _, png in rd.plots:
        write_bytes(files / f"{stem}.png", png)
    write_text(out, render(rd))
    return out
