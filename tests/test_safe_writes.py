"""Safe writes: SIGINT or SIGTERM arriving while graphpass writes an output leaves the previous file
intact (or no file) and no temporary file; the command exits 130 / 143 with one line.

Each run is a real `graphpass` process. To land the signal at a known point of the write, a small
harness wraps two calls in the child: graphpass.graph.io.temp_beside (pause right after the output's
temporary file exists, nothing renamed yet) and os.replace (pause between renaming the external
data file and the model file, the one moment two files must change together). The harness
touches a marker file when it pauses; the test then sends the signal. One more run uses
no harness at all: a model large enough that saving takes a moment, signalled as soon as the
temporary file appears."""
from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest

from conftest import inits
from graphpass.graph.io import load_model, save_model
from graphpass.testing.synthetic import SyntheticConfig, build_llama, random_inputs

WAIT_S = 300  # the child reaches its pause / exits within this, or the test fails (slack for a
#               loaded machine: at load 15, three runs of these tests overran 60 s)

HARNESS = '''
import faulthandler, os, signal, sys, time
from pathlib import Path

faulthandler.register(signal.SIGUSR1, all_threads=True)   # the test asks for stacks if the child hangs

marker, where, target, pause = Path(sys.argv[1]), sys.argv[2], sys.argv[3], float(sys.argv[4])
writers = {"save_model", "save_graph", "write_bytes", "save_data"}
real_replace = os.replace


def hold():
    marker.write_text("paused")
    end = time.monotonic() + pause
    while time.monotonic() < end:   # short naps, not one long sleep: the kernel may hand the signal
        time.sleep(0.02)            # to another thread (onnxruntime's pool), which does not cut the
                                    # main thread's sleep short; its Python handler runs at the next wake


def replace(src, dst):
    real_replace(src, dst)
    if where == "pair" and Path(dst).name == target + ".data":
        hold()


import graphpass.calibrate.data, graphpass.graph.io
real_temp = graphpass.graph.io.temp_beside


def temp_beside(p, *a, **k):
    name = real_temp(p, *a, **k)
    if where == "temp" and Path(p).name == target and sys._getframe(1).f_code.co_name in writers:
        hold()                       # the temporary file exists; nothing is renamed yet
    return name


os.replace = replace
graphpass.graph.io.temp_beside = graphpass.calibrate.data.temp_beside = temp_beside
argv = sys.argv[5:]
if argv[0] == "save-external":   # graphpass.graph.io.save_model(load_model(SRC), OUT, external=True)
    import signal
    from graphpass.cli.main import Terminated, _terminate
    from graphpass.graph.io import load_model, save_model

    signal.signal(signal.SIGTERM, _terminate)      # as graphpass.cli.main.main does
    try:
        save_model(load_model(argv[1]), argv[2], external=True)
    except KeyboardInterrupt as e:
        sys.exit(143 if isinstance(e, Terminated) else 130)
    sys.exit(0)
from graphpass.cli.main import main
sys.exit(main(argv))
'''


@pytest.fixture(scope="module")
def harness(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("harness") / "harness.py"
    p.write_text(HARNESS)
    return p


def signalled(harness: Path, tmp_path: Path, argv: list, sig: int, where: str, target: str,
              pause: float = WAIT_S) -> tuple[int, str]:
    """Run `graphpass argv` under the harness, send `sig` once it pauses; (exit status, stderr)."""
    marker = tmp_path / "paused"
    marker.unlink(missing_ok=True)
    cmd = [sys.executable, str(harness), str(marker), where, target, str(pause), *map(str, argv)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    t0 = time.monotonic()
    while not marker.exists():
        if proc.poll() is not None or time.monotonic() - t0 > WAIT_S:
            proc.kill()
            out, err = proc.communicate()
            pytest.fail(f"the child never paused (exit {proc.returncode}): {err[-2000:]}")
        time.sleep(0.005)
    proc.send_signal(sig)
    try:
        _, err = proc.communicate(timeout=WAIT_S)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGUSR1)          # faulthandler: every thread's stack to stderr
        time.sleep(1)
        proc.kill()
        _, err = proc.communicate()
        pytest.fail(f"the child did not exit within {WAIT_S} s of the signal; its stacks:\n{err[-4000:]}")
    return proc.returncode, err


def temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


EXIT = {signal.SIGINT: (130, "interrupted"), signal.SIGTERM: (143, "terminated")}


# ---------------------------------------------------------------------------- each writer
@pytest.mark.parametrize("command, sig", [("quantize", signal.SIGINT), ("quantize", signal.SIGTERM),
                                          ("smooth", signal.SIGTERM), ("calibrate", signal.SIGINT),
                                          ("report", signal.SIGTERM)])
def test_signal_while_writing_keeps_the_previous_file(harness, tmp_path, synth, calibrated, command, sig):
    s = synth("llama")
    out = tmp_path / "out"
    out.mkdir()
    calibrated("llama").save(tmp_path / "stats.npz")
    previous = {"quantize": (out / "q.onnx", b"previous model"), "smooth": (out / "m.onnx", b"previous model"),
                "calibrate": (out / "s.npz", (tmp_path / "stats.npz").read_bytes()),
                "report": (out / "r.json", b'{"previous": true}\n')}[command]
    previous[0].write_bytes(previous[1])
    argv = {"quantize": ["quantize", s.path, "--data", s.data_path, "--alpha", "0.5", "-o", out / "q.onnx"],
            "smooth": ["smooth", s.path, "--stats", tmp_path / "stats.npz", "-o", out / "m.onnx"],
            "calibrate": ["calibrate", s.path, "--data", s.data_path, "-o", out / "s.npz"],
            "report": ["quantize", s.path, "--data", s.data_path, "--alpha", "0.5", "-o", out / "q.onnx",
                       "--report", out / "r.json"]}[command]
    rc, err = signalled(harness, tmp_path, argv, sig, "temp", previous[0].name)
    status, word = EXIT[sig]
    name = "quantize" if command == "report" else command
    assert rc == status and err.splitlines()[-1] == f"graphpass {name}: {word}", (rc, err[-2000:])
    assert "Traceback" not in err
    assert previous[0].read_bytes() == previous[1]        # the previous file, intact
    assert temporaries(out) == []                         # and nothing else left behind
    expected = {"report": ["q.onnx", "r.json"]}.get(command, [previous[0].name])  # model done before report
    assert sorted(p.name for p in out.iterdir()) == expected


def test_signal_with_no_previous_file_leaves_no_file(harness, tmp_path, synth):
    s = synth("llama")
    rc, err = signalled(harness, tmp_path, ["quantize", s.path, "--no-smooth", "--scheme", "dynamic",
                                            "-o", tmp_path / "q.onnx"], signal.SIGTERM, "temp", "q.onnx")
    assert rc == 143 and err.splitlines()[-1] == "graphpass quantize: terminated", err[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["paused"]


# ---------------------------------------------------------------------------- model + external data
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_model_and_external_data_change_together(harness, tmp_path, synth, sig):
    """Signalled between renaming the new .data into place and renaming the new model: the signal
    waits until both are in place (the old model must never meet the new data)."""
    old, new = synth("prenorm"), synth("llama")
    out = tmp_path / "out"
    out.mkdir()
    save_model(old.fresh(), out / "m.onnx", external=True)
    rc, err = signalled(harness, tmp_path, ["save-external", new.path, out / "m.onnx"], sig, "pair",
                        "m.onnx", pause=1.0)
    assert rc == EXIT[sig][0], err[-2000:]
    assert sorted(p.name for p in out.iterdir()) == ["m.onnx", "m.onnx.data"]
    got, want = inits(load_model(out / "m.onnx")), inits(new.model)
    assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)


# ---------------------------------------------------------------------------- no harness
def test_sigterm_during_a_real_save(tmp_path):
    """No wrapper: a 60 MB model whose smoothed copy takes a moment to write; SIGTERM as soon as
    the output's temporary file appears. Either the previous file is intact (the usual case) or,
    if the write won the race, the new file is complete; never a temporary file."""
    cfg = SyntheticConfig(layers=4, hidden=384, heads=6, kv_heads=2, ffn=1536, vocab=4096,
                          outlier_channels=(3, 17))
    m = build_llama(cfg)
    src = tmp_path / "src"
    src.mkdir()
    save_model(m, src / "model.onnx")
    np.savez(src / "data.npz", **random_inputs(m, 1, 8, seed=1))
    from graphpass.calibrate.collect import calibrate

    calibrate(src / "model.onnx", random_inputs(m, 1, 8, seed=1), progress=False).save(src / "s.npz")
    out = tmp_path / "out"
    out.mkdir()
    (out / "m.onnx").write_bytes(b"previous model")
    cmd = [sys.executable, "-m", "graphpass", "smooth", str(src / "model.onnx"), "--stats", str(src / "s.npz"),
           "-o", str(out / "m.onnx")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    t0 = time.monotonic()
    while not list(out.glob(".m.onnx.*.tmp")) and proc.poll() is None:   # not check_output's .probe
        assert time.monotonic() - t0 < WAIT_S
        time.sleep(0.001)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=WAIT_S)
    assert "Traceback" not in err
    assert temporaries(out) == []
    if proc.returncode == 143:
        assert (out / "m.onnx").read_bytes() == b"previous model"
        assert err.splitlines()[-1] == "graphpass smooth: terminated"
    else:   # the signal came after the rename (or after the exit)
        assert proc.returncode in (0, -signal.SIGTERM), err[-2000:]
        onnx.checker.check_model(str(out / "m.onnx"))
