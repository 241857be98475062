"""Subcommands debug (per-layer error) and report (one self-contained HTML page)."""
from __future__ import annotations

import argparse

from graphpass.errors import GraphpassError


def _cmd_debug(a: argparse.Namespace) -> None:
    from graphpass.cli.common import load_checked_data
    from graphpass.validate.debug import debug, write_json

    data = load_checked_data(a.data, a.reference)
    res = debug(a.reference, a.candidate, data, batch_size=a.batch_size, threads=a.threads,
                local=not a.no_local)
    print(res.format(a.top, a.sort))
    if a.json:
        write_json(res, a.json, a.sort)
        print(f"wrote {a.json}")


def _cmd_report(a: argparse.Namespace) -> None:
    from graphpass.validate.report import ReportInputs, write_report

    if not a.output.endswith((".html", ".htm")):
        raise GraphpassError(f"-o {a.output}: the report is an HTML file (.html)")
    inp = ReportInputs(reference=a.reference, candidate=a.candidate, data=a.data, stats=a.stats,
                       quantize_report=a.quantize_report, eval_json=a.eval_json, bench_json=a.bench_json,
                       debug_json=a.debug_json, sites=a.sites, bench_seconds=a.bench_seconds,
                       threads=a.threads, title=a.title)
    out = write_report(inp, a.output)
    print(f"wrote {out} (plots also as PNG in {out.with_name(out.stem + '_files')}/)")


def add_parsers(sub, positive) -> None:
    d = sub.add_parser("debug", help="per-layer error (SQNR, relative L2) of a rewritten graph vs FP32")
    d.add_argument("reference", help="the FP32 model")
    d.add_argument("candidate", help="the rewritten (quantized) model")
    d.add_argument("--data", required=True, help="inputs (.npz)")
    d.add_argument("--top", type=positive(int), default=10, help="layers to print (default 10)")
    d.add_argument("--sort", choices=["sqnr", "layer"], default="sqnr",
                   help="rank by SQNR at the layer's output (default) or of the layer alone")
    d.add_argument("--no-local", action="store_true",
                   help="skip the layer-alone comparison (one float MatMul less per layer)")
    d.add_argument("--batch-size", type=positive(int), default=1)
    d.add_argument("--threads", type=positive(int), default=2)
    d.add_argument("--json", help="also write every layer's numbers as JSON")
    d.set_defaults(func=_cmd_debug)

    r = sub.add_parser("report", help="one self-contained HTML report: sites, plots, errors, accuracy, speed")
    r.add_argument("reference", help="the FP32 model")
    r.add_argument("candidate", help="the rewritten (quantized) model")
    r.add_argument("--data", required=True, help="evaluation inputs (.npz), kept apart from calibration")
    r.add_argument("-o", "--output", required=True, help="report.html (plots go to report_files/)")
    r.add_argument("--stats", help="calibration stats (graphpass calibrate) for the per-channel plots")
    r.add_argument("--quantize-report", help="the JSON of graphpass quantize --report")
    r.add_argument("--eval-json", help="reuse graphpass eval --json output instead of evaluating")
    r.add_argument("--bench-json", help="reuse graphpass bench --json output instead of timing")
    r.add_argument("--debug-json", help="reuse graphpass debug --json output instead of measuring")
    r.add_argument("--sites", type=positive(int), default=4, help="sites to plot, worst outliers first")
    r.add_argument("--bench-seconds", type=float, default=3.0, help="timing budget at 1x512 (0: skip)")
    r.add_argument("--threads", type=positive(int), default=2)
    r.add_argument("--title", help="page title")
    r.set_defaults(func=_cmd_report)
