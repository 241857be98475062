"""graphpass report: one self-contained HTML page (tables, embedded PNGs, no script, nothing
fetched), the same PNGs beside it, and it renders in headless Chromium with every image loaded."""
from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
from pathlib import Path

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
