"""Subcommands calibrate, smooth and inspect."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from graphpass.cli.common import OVERWRITE_HELP, check_output, site_alpha
from graphpass.errors import GraphpassError


def _cmd_calibrate(a: argparse.Namespace) -> None:
    from graphpass.calibrate.data import check_npz_dest
    from graphpass.calibrate.stats import Stats

    check_npz_dest(Path(a.output))
    check_output(a.output, a.output, overwrite=True)     # the output can be written: before any work
    if a.merge:
        stats = Stats.load(a.merge[0])
        for p in a.merge[1:]:
            stats = stats.merge(Stats.load(p))
    else:
        if not a.model or not a.data:
            raise GraphpassError("give MODEL and --data DATA.npz (or --merge A B ...)")
        from graphpass.calibrate.collect import calibrate
        from graphpass.calibrate.data import load_data

        if a.decode_steps < 0:
            raise GraphpassError(f"--decode-steps must be >= 0, got {a.decode_steps}")
        stats = calibrate(a.model, load_data(a.data), batch_size=a.batch_size, threads=a.threads,
                          decode_steps=a.decode_steps)
    stats.save(a.output)
    print(f"wrote {a.output}: {len(stats.min)} tensors, {stats.samples} samples")


def _cmd_smooth(a: argparse.Namespace) -> None:
    from graphpass.calibrate.stats import Stats
    from graphpass.graph.gs_io import import_graph
    from graphpass.graph.io import load_model, save_graph, write_text
    from graphpass.passes.smooth import SmoothConfig
    from graphpass.passes.smooth_checked import check_alpha, smooth_model

    check_alpha(a.alpha)
    check_output(a.model, a.output, a.overwrite, also=(a.report,) if a.report else ())
    stats = Stats.load(a.stats)
    base = str(Path(a.model).parent.resolve())
    g = import_graph(load_model(a.model, load_weights=False), base)   # weights read one at a time
    cfg = SmoothConfig(alpha=a.alpha, site_alpha=site_alpha(a.site_alpha), allow_mul=a.allow_mul)
    g, rep = smooth_model(g, stats, cfg, base_dir=base)
    if not rep.rows and not rep.muls_added:
        print(f"warning: {a.model} has no smoothing site; writing the graph unchanged", file=sys.stderr)
    print(rep.format())
    save_graph(g, a.output)      # what no site touched (the embedding, say) is copied over
    print(f"wrote {a.output}")
    if a.report:
        write_text(a.report, json.dumps({"sites": rep.rows, "uncovered": rep.uncovered,
                                         "muls_added": rep.muls_added}, indent=2) + "\n")


def _cmd_inspect(a: argparse.Namespace) -> None:
    from graphpass.graph.io import load_model
    from graphpass.match.sites import analyze
    from graphpass.passes.smooth import site_scales, weight_absmax
    from graphpass.passes.smooth_checked import check_alpha
    from graphpass.calibrate.stats import Stats

    check_alpha(a.alpha)
    an = analyze(load_model(a.model, load_weights=False), str(Path(a.model).parent.resolve()))
    stats = Stats.load(a.stats) if a.stats else None
    if stats:
        stats.require({s.act: s.consumers[0].shape(an.consts)[0] for s in an.sites}, "stats")
    print(f"{len(an.linears)} linear layers, {len(an.sites)} smoothing sites, {len(an.uncovered)} not covered")
    for s in an.sites:
        extra = ""
        if stats:
            act = stats.absmax(s.act)
            sc = site_scales(s, an.consts, act, a.alpha)
            extra = f"  act max/med {_r(act):.1f} -> {_r(act / sc):.1f} at alpha {a.alpha}"
        clone = " (norm duplicated: output also feeds a residual)" if getattr(s.fold, "clone", False) else ""
        print(f"  {s.name}  ->  {', '.join(lin.name for lin in s.consumers)}{clone}{extra}")
    for name, why in an.uncovered:
        print(f"  not covered: {name}: {why}")
    if a.plot:
        if not stats or not a.output:
            raise GraphpassError("--plot needs --stats STATS and -o FILE.png")
        try:
            s = an.site(a.plot)
        except KeyError:
            raise GraphpassError(f"no site named '{a.plot}' (names are listed above)") from None
        from graphpass.validate.plots import plot_site

        act = stats.absmax(s.act)
        plot_site(s.name, act, weight_absmax(s.consumers, an.consts), site_scales(s, an.consts, act, a.alpha),
                  a.output)
        print(f"wrote {a.output}")


def _r(v) -> float:
    import numpy as np

    med = float(np.median(v))
    return float(v.max() / med) if med > 0 else float("inf")


def add_parsers(sub, positive) -> None:
    c = sub.add_parser("calibrate", help="per-channel activation ranges, streamed through onnxruntime")
    c.add_argument("model", nargs="?")
    c.add_argument("--data")
    c.add_argument("--merge", nargs="+", metavar="STATS", help="combine stats files (min/max)")
    c.add_argument("--batch-size", type=positive(int), default=1)
    c.add_argument("--decode-steps", type=int, default=4, metavar="K",
                   help="with-past graphs: each window is a prefill plus K one-token decode steps")
    c.add_argument("--threads", type=positive(int), default=2)
    c.add_argument("-o", "--output", required=True)
    c.set_defaults(func=_cmd_calibrate)

    s = sub.add_parser("smooth", help="fold SmoothQuant scales into norms and linear layers")
    s.add_argument("model")
    s.add_argument("--stats", required=True)
    s.add_argument("--alpha", type=float, default=0.5)
    s.add_argument("--site-alpha", action="append", metavar="SITE=ALPHA", help="per-site override")
    s.add_argument("--allow-mul", action="store_true", help="insert a Mul where no producer can absorb 1/s")
    s.add_argument("--report", help="write the per-site report as JSON")
    s.add_argument("--overwrite", action="store_true",
                   help=OVERWRITE_HELP)
    s.add_argument("-o", "--output", required=True)
    s.set_defaults(func=_cmd_smooth)

    i = sub.add_parser("inspect", help="smoothing sites, uncovered layers and outlier ratios")
    i.add_argument("model")
    i.add_argument("--stats")
    i.add_argument("--alpha", type=float, default=0.5)
    i.add_argument("--plot", metavar="SITE", help="plot per-channel magnitudes of this site")
    i.add_argument("-o", "--output", help="PNG file for --plot")
    i.set_defaults(func=_cmd_inspect)
