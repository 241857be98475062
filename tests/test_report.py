"""graphpass report: one self-contained HTML page (tables, embedded PNGs, no script, nothing
fetched), the same PNGs beside it, and it renders in headless Chromium with every image loaded.
The page leads with the answer (headline), then the plots, then the tables collapsed, worst rows
first; the charts' legends and labels are checked on the matplotlib artists."""
from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from conftest import cli_error, cli_ok

SITES = 1                                                 # site plots asked for (tiny llama: 8 sites)
CHARTS = 2                                                # per-layer SQNR chart, alpha chart
TABLES = {"summary", "sites", "layers", "accuracy", "speed"}
CHROMIUM = next((c for c in (shutil.which("chromium"), "/usr/bin/chromium") if c and Path(c).is_file()), None)
# counts, once the page has loaded, the images that decoded (complete, non-zero width) and tables
PROBE = ("<script>window.addEventListener('load',function(){var im=document.images,n=0;"
         "for(var i=0;i<im.length;i++){if(im[i].complete&&im[i].naturalWidth>0)n++;}"
         "document.body.setAttribute('data-images',n+'/'+im.length);"
         "document.body.setAttribute('data-tables',document.querySelectorAll('table').length);});</script>")


@pytest.fixture(scope="module")
def page(synth, quantized, tmp_path_factory):
    """The report of the tiny llama quantized with token, given its quantize --report JSON."""
    import io
    from contextlib import redirect_stdout

    from graphpass.cli.main import main

    s = synth("llama")
    qpath, res, _ = quantized("llama", scheme="token")
    d = tmp_path_factory.mktemp("report")
    rep = {"alphas": res.alphas, "smoothing": res.smooth.rows, "kept_float": res.quant.skipped}
    (d / "q.json").write_text(json.dumps(rep))
    with redirect_stdout(io.StringIO()):
        assert main(["report", str(s.path), str(qpath), "--data", str(s.data_path), "-o", str(d / "report.html"),
                     "--quantize-report", str(d / "q.json"), "--sites", str(SITES), "--bench-seconds", "0.2"]) == 0
    return d / "report.html", rep


def _images(html: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)]


def test_self_contained_with_tables_and_images(page):
    path, rep = page
    html = path.read_text()
    assert set(re.findall(r'<table id="([^"]+)"', html)) >= TABLES
    imgs = _images(html)
    assert len(imgs) == html.count("<img") == SITES + CHARTS
    assert all(b.startswith(b"\x89PNG\r\n\x1a\n") for b in imgs)
    assert "<script" not in html and "http://" not in html and "https://" not in html
    assert not re.search(r'src="(?!data:)', html)                       # nothing fetched
    for row in rep["smoothing"]:                                       # every site, with its α
        assert row["site"] in html


def test_pngs_beside_the_page_are_the_embedded_ones(page):
    path, _ = page
    files = sorted((path.parent / "report_files").glob("*.png"))
    assert len(files) == SITES + CHARTS
    assert sorted(f.read_bytes() for f in files) == sorted(_images(path.read_text()))


def test_accuracy_and_speed_tables_hold_the_numbers(page, synth, quantized):
    from graphpass.validate.evaluate import evaluate

    path, _ = page
    html = path.read_text()
    s = synth("llama")
    qpath, _, _ = quantized("llama", scheme="token")
    ev = evaluate(qpath, s.path, s.data, progress=False)
    table = re.search(r'<table id="accuracy">.*?</table>', html).group(0)
    assert f"{ev['perplexity_candidate']:.3f}" in table and f"{ev['kl']:.5f}" in table
    speed = re.search(r'<table id="speed">.*?</table>', html).group(0)
    assert "latency 1x512" in speed and "size on disk" in speed


def test_reuses_given_json_and_recomputes_sites_without_a_report(synth, quantized, tmp_path, capsys):
    s = synth("llama")
    qpath, _, _ = quantized("llama", scheme="token")
    ev = {"kind": "causal-lm", "samples": 4, "tokens": 64, "perplexity_reference": 123.456,
          "perplexity_candidate": 124.0, "kl": 0.25, "top1": 0.5, "outputs": {}}
    (tmp_path / "ev.json").write_text(json.dumps(ev))
    out = tmp_path / "r.html"
    cli_ok(capsys, ["report", s.path, qpath, "--data", s.data_path, "-o", out, "--eval-json", tmp_path / "ev.json",
                    "--sites", "1", "--bench-seconds", "0"])
    html = out.read_text()
    assert "123.456" in html and "0.25000" in html                      # taken from the JSON, not recomputed
    assert "recomputed" in html and "first 4 samples" in html           # no report, no stats: says so
    assert len(_images(html)) == 1 + CHARTS


def test_cli_errors(synth, quantized, tmp_path, capsys):
    s = synth("llama")
    qpath, _, _ = quantized("llama", scheme="token")
    err = cli_error(capsys, ["report", s.path, qpath, "--data", s.data_path, "-o", tmp_path / "r.pdf"])
    assert "HTML file" in err
    (tmp_path / "bad.json").write_text("{not json")
    err = cli_error(capsys, ["report", s.path, qpath, "--data", s.data_path, "-o", tmp_path / "r.html",
                             "--eval-json", tmp_path / "bad.json"], [tmp_path / "r.html"])
    assert "not a JSON file" in err


EVAL = {"kind": "causal-lm", "samples": 4, "tokens": 64, "perplexity_reference": 2.0,
        "perplexity_candidate": 2.1, "kl": 0.01, "top1": 0.9, "outputs": {}}
DECODE_BENCH = {"prompt_len": 8, "steps": 4, "threads": 1, "reference": {}, "candidate": {}, "ratio": {}}


@pytest.mark.parametrize("flag,given", [("--eval-json", DECODE_BENCH), ("--eval-json", {}),
                                        ("--bench-json", EVAL), ("--bench-json", DECODE_BENCH),
                                        ("--debug-json", EVAL), ("--quantize-report", EVAL)])
def test_json_of_another_command_is_a_one_line_error(synth, quantized, tmp_path, capsys, flag, given):
    """A JSON that is not the named command's output is refused before any work, by name (a bench
    --decode JSON as --eval-json was a KeyError traceback after report_files/ was written; an eval
    JSON as --bench-json or --quantize-report was silently ignored)."""
    s = synth("llama")
    qpath, _, _ = quantized("llama", scheme="token")
    (tmp_path / "given.json").write_text(json.dumps(given))
    out = tmp_path / "r.html"
    err = cli_error(capsys, ["report", s.path, qpath, "--data", s.data_path, "-o", out, flag, tmp_path / "given.json",
                             "--bench-seconds", "0"], [out, tmp_path / "r_files"])
    assert "given.json" in err and "not the output of" in err


def _render(html: str, tmp: Path) -> str:
    """The <body> tag Chromium leaves after loading `html` with the probe script added."""
    tmp.mkdir(exist_ok=True)
    probe = tmp / "probe.html"
    probe.write_text(html.replace("</body>", PROBE + "</body>"))
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp / 'profile'}", "--virtual-time-budget=5000", "--dump-dom", probe.as_uri()]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=90).stdout
    return re.search(r"<body[^>]*>", out).group(0)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (.ci/run installs it)")
def test_renders_in_chromium_with_every_image_loaded(page, tmp_path):
    path, _ = page
    html = path.read_text()
    n = SITES + CHARTS
    body = _render(html, tmp_path)
    assert f'data-images="{n}/{n}"' in body
    assert int(re.search(r'data-tables="(\d+)"', body).group(1)) >= len(TABLES)
    # the probe can fail: one image with corrupt bytes is counted as not loaded
    broken = html.replace('src="data:image/png;base64,iVBOR', 'src="data:image/png;base64,AAAA', 1)
    assert f'data-images="{n - 1}/{n}"' in _render(broken, tmp_path / "b")


# ---------------------------------------------------------------------------- the answer first
class _Outline(HTMLParser):
    """Where each table and image sits: its section id and whether it is inside a <details>."""

    def __init__(self):
        super().__init__()
        self.section, self.details, self.items = None, 0, []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "section":
            self.section = a.get("id")
        elif tag == "details":
            self.details += 1
        if tag in ("table", "img"):
            self.items.append((tag, a.get("id"), self.section, self.details > 0))

    def handle_endtag(self, tag):
        if tag == "details":
            self.details -= 1
        elif tag == "section":
            self.section = None


def _outline(html: str) -> list[tuple]:
    p = _Outline()
    p.feed(html)
    return p.items


def test_headline_then_plots_then_collapsed_tables(page):
    path, _ = page
    html = path.read_text()
    sections = re.findall(r'<section id="([^"]+)"', html)
    assert sections == ["headline", "plots", "tables", "notes"]
    items = _outline(html)
    assert items[0] == ("table", "headline", "headline", False)          # the first thing on the page
    imgs = [x for x in items if x[0] == "img"]
    assert len(imgs) == SITES + CHARTS and all(x[2] == "plots" and not x[3] for x in imgs)
    tables = [x for x in items if x[0] == "table" and x[1] != "headline"]
    assert {x[1] for x in tables} >= TABLES
    assert all(x[2] == "tables" and x[3] for x in tables), tables        # every other table collapsed
    assert "<details open" not in html
    kinds = [x[0] for x in items]                                         # headline, images, tables
    assert kinds == ["table"] + ["img"] * len(imgs) + ["table"] * len(tables)


def _cells(html: str, tid: str) -> list[list[str]]:
    table = re.search(rf'<table id="{tid}">(.*?)</table>', html, re.S).group(1)
    body = table.split("<tbody>")[1]
    return [re.findall(r"<td[^>]*>(.*?)</td>", row) for row in re.findall(r"<tr>(.*?)</tr>", body)]


def test_headline_holds_accuracy_latency_size_and_what_stayed_in_float(page, synth, quantized):
    from graphpass.validate.evaluate import evaluate

    path, rep = page
    html = path.read_text()
    s = synth("llama")
    qpath, _, _ = quantized("llama", scheme="token")
    ev = evaluate(qpath, s.path, s.data, progress=False)
    rows = {r[0]: r[1:] for r in _cells(html, "headline")}
    assert rows["perplexity"] == [f"{ev['perplexity_reference']:.3f}", f"{ev['perplexity_candidate']:.3f}",
                                  f"{ev['perplexity_candidate'] / ev['perplexity_reference']:.4f}x"]
    assert rows["KL(FP32 ‖ candidate)"][1] == f"{ev['kl']:.5f}"
    assert rows["top-1 agreement"][1] == f"{ev['top1']:.4f}"
    assert re.fullmatch(r"\d+\.\d{3}x", rows["latency 1x512"][2])
    ref, cand = s.path.stat().st_size, Path(qpath).stat().st_size
    assert rows["size on disk"][2] == f"{cand / ref:.3f}x"
    head = html[html.index('<section id="headline">'):html.index('<section id="plots">')]
    assert rep["kept_float"], "the tiny llama keeps its LM head in float: the check below needs one"
    for name, why in rep["kept_float"]:                                   # not quantized, with the reason
        assert name in head and why.split(" (")[0] in head
    n_q = len(rep["smoothing"])
    assert f"{n_q} smoothing sites" in head and "not smoothed" in head


def test_tables_put_the_worst_rows_first(page):
    path, rep = page
    html = path.read_text()
    sqnr = [float(r[2]) for r in _cells(html, "layers")]
    assert len(sqnr) > 1 and sqnr == sorted(sqnr)                         # lowest SQNR first
    after = [float(r[4].split("-&gt;")[1]) for r in _cells(html, "sites")]
    assert len(after) == len(rep["smoothing"]) and after == sorted(after, reverse=True)


# ---------------------------------------------------------------------------- the charts' artists
SITES_3_KINDS = [{"site": f"s{k}", "kind": kind, "alpha": a} for k, (kind, a) in
                 enumerate([("rmsnorm", 0.5), ("attn", 0.3), ("rmsnorm", 0.7), ("glu", 0.2), ("attn", 0.9)])]


def test_alpha_chart_legend_has_one_entry_per_kind_in_its_bars_colour():
    import matplotlib.pyplot as plt
    from matplotlib.colors import to_rgba

    from graphpass.validate.plots import alpha_figure

    fig = alpha_figure(SITES_3_KINDS)
    try:
        (ax,), (legend,) = fig.axes, fig.legends
        labels = [x.get_text() for x in legend.get_texts()]
        assert sorted(labels) == ["attn", "glu", "rmsnorm"]
        colour = {lab: to_rgba(h.get_facecolor()) for lab, h in zip(labels, legend.legend_handles)}
        assert len(set(colour.values())) == 3                             # distinct colours
        bars = {}                                                         # x position -> (height, colour)
        for c in ax.containers:
            for b in c.patches:
                bars[round(b.get_x() + b.get_width() / 2)] = (b.get_height(), to_rgba(b.get_facecolor()))
        assert sorted(bars) == list(range(len(SITES_3_KINDS)))            # one bar per site, graph order
        for k, s in enumerate(SITES_3_KINDS):
            assert bars[k][0] == pytest.approx(s["alpha"]) and bars[k][1] == colour[s["kind"]]
    finally:
        plt.close(fig)


def _layer_rows(n: int) -> list[dict]:
    rng = np.random.default_rng(0)
    return [{"name": f"/model/layers.{k // 7}/mlp/down_proj_{k % 7}/MatMul", "quantized": True, "index": k,
             "sqnr_db": float(rng.uniform(10, 40)), "layer_sqnr_db": float(rng.uniform(35, 45))} for k in range(n)]


@pytest.mark.parametrize("n", [6, 60])
def test_layer_chart_labels_sit_beside_the_bars_without_overlap(n):
    import matplotlib.pyplot as plt

    from graphpass.validate.plots import WORST, layer_error_figure

    rows = _layer_rows(n)
    fig = layer_error_figure(rows)
    try:
        fig.canvas.draw()
        r = fig.canvas.get_renderer()
        ax = fig.axes[0]
        bars = [b for c in ax.containers for b in c.patches]
        assert len(bars) == n and all(b.get_height() < 1 and b.get_width() > 1 for b in bars)   # horizontal
        labels = [t for t in ax.get_yticklabels() if t.get_text()]
        assert len(labels) == n and labels[0].get_text() == "model/layers.0/mlp/down_proj_0"
        box = ax.get_window_extent(r)
        ext = [t.get_window_extent(r) for t in labels]
        assert all(e.x1 <= box.x0 + 0.5 for e in ext)                    # left of the plotting area
        ys = sorted((e.y0, e.y1) for e in ext)
        assert all(lo2 >= hi1 - 0.5 for (_, hi1), (lo2, _) in zip(ys, ys[1:]))   # no two labels overlap
        assert fig.get_figheight() > 0.1 * n                              # the chart grows with the rows
        red = [t.get_text() for t in labels if t.get_color() == "tab:red"]
        worst = sorted(rows, key=lambda x: x["sqnr_db"])[:WORST]
        assert sorted(red) == sorted(x["name"].strip("/").removesuffix("/MatMul") for x in worst)
    finally:
        plt.close(fig)


def test_layers_the_budget_put_back_are_named_so(synth, quantized, tmp_path, capsys):
    """A quantize report with a budget: its layers read 'put back in float by the accuracy budget'
    (the pipeline records them as --skip matches), and the verdict is in the headline."""
    s = synth("llama")
    qpath, res, _ = quantized("llama", scheme="token")
    back = res.quant.quantized[:2]
    budget = {"budget": {"max_kl": 0.01, "max_ppl_increase": None}, "held_out_samples": 3, "met": False,
              "kept_float": back, "kept_float_modules": back, "attempts": [
                  {"float_layers": k, "kl": 0.1 / (k + 1), "ppl_increase": None, "met": False} for k in range(3)]}
    rep = {"alphas": res.alphas, "smoothing": res.smooth.rows, "budget": budget,
           "kept_float": res.quant.skipped + [[n, "matches a --skip pattern"] for n in back]}
    (tmp_path / "q.json").write_text(json.dumps(rep))
    out = tmp_path / "r.html"
    cli_ok(capsys, ["report", s.path, qpath, "--data", s.data_path, "-o", out, "--quantize-report",
                    tmp_path / "q.json", "--sites", "1", "--bench-seconds", "0"])
    html = out.read_text()
    head = html[html.index('<section id="headline">'):html.index('<section id="plots">')]
    assert "put back in float by the accuracy budget: 2 layers" in head and all(n in head for n in back)
    assert "--skip" not in head and "KL ≤ 0.01 on 3 held-out samples" in head and "not met" in head
    assert len(_cells(html, "budget")) == 3 and html.index('id="budget"') > html.index('<section id="tables">')
