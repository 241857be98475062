"""Progress: tqdm frames only on a terminal; a log (stderr to a pipe or file) gets one line per step."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from graphpass.progress import bar

ROOT = Path(__file__).resolve().parents[1]
STEP_LINE = re.compile(r"^(calibrate|alpha search): (\d+)/(\d+) (batch|batches|site|sites), \d+\.\d s$")


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _quantize_argv(s, out: Path) -> list[str]:
    return [sys.executable, "-m", "graphpass", "quantize", str(s.path), "-o", str(out), "--data", str(s.data_path),
            "--scheme", "token"]


def test_log_gets_one_line_per_step_and_no_carriage_return(synth, tmp_path):
    s = synth("llama")
    r = subprocess.run(_quantize_argv(s, tmp_path / "q.onnx"), capture_output=True, text=True, env=_env(),
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert "\r" not in r.stderr and "\x1b" not in r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 2, lines                             # calibrate, alpha search: nothing else
    steps = [STEP_LINE.match(x) for x in lines]
    assert all(steps), lines
    assert [m.group(1) for m in steps] == ["calibrate", "alpha search"]
    for m in steps:
        assert m.group(2) == m.group(3) and int(m.group(2)) > 0   # every item, counted once


def test_terminal_gets_the_tqdm_bar(synth, tmp_path):
    """The same command with stderr on a pseudo-terminal draws frames (so the test above can fail)."""
    pty = pytest.importorskip("pty")
    s = synth("llama")
    import fcntl
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))   # a new pty is 0 x 0
    try:
        p = subprocess.Popen(_quantize_argv(s, tmp_path / "q.onnx"), stdout=subprocess.DEVNULL, stderr=slave,
                             env=_env())
        os.close(slave)
        chunks = []
        while True:
            try:
                b = os.read(master, 4096)
            except OSError:                                     # EIO: the child closed the terminal
                break
            if not b:
                break
            chunks.append(b)
        assert p.wait(timeout=300) == 0
    finally:
        os.close(master)
    out = b"".join(chunks).decode(errors="replace")
    assert "\r" in out and "calibrate:" in out and "100%" in out


def test_quiet_bar_counts_and_prints_once(capsys):
    assert not sys.stderr.isatty()                                     # capsys: a log, not a terminal
    assert list(bar(iter(range(3)), "step", "batch", total=3)) == [0, 1, 2]
    err = capsys.readouterr().err
    assert re.fullmatch(r"step: 3/3 batches, \d+\.\d s\n", err), err
    assert list(bar([7], "one", "site")) == [7]                          # total from len()
    assert re.fullmatch(r"one: 1/1 site, \d+\.\d s\n", capsys.readouterr().err)
    assert list(bar(iter("ab"), "gen", "row")) == ["a", "b"]              # no total known
    assert re.fullmatch(r"gen: 2 rows, \d+\.\d s\n", capsys.readouterr().err)


def test_nothing_printed_when_disabled_or_when_the_step_fails(capsys):
    assert list(bar(range(4), "off", "batch", enabled=False)) == [0, 1, 2, 3]

    def boom():
        yield 1
        raise ValueError("bad batch")

    with pytest.raises(ValueError):
        for _ in bar(boom(), "failing", "batch", total=2):
            pass
    assert capsys.readouterr().err == ""
