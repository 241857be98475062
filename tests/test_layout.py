"""The package reads as the data flow, with no import cycle between its modules.

Every `import` of a graphpass module counts, also those inside functions (they still tie the
modules together), except imports guarded by TYPE_CHECKING.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import graphpass

ROOT = Path(graphpass.__file__).parent


def _module(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    mod, out = _module(path), set()
    pkg = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(pkg.split(".")[: len(pkg.split(".")) - node.level + 1] + ([base] if base else []))
            if base.startswith("graphpass"):
                for a in node.names:     # `from graphpass.cli import quant` imports a module
                    sub = f"{base}.{a.name}"
                    out.add(sub if (ROOT.parent / (sub.replace(".", "/") + ".py")).exists() else base)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("graphpass")}
    return out - {mod}


def _graph() -> dict[str, set[str]]:
    return {_module(p): _imports(p) for p in ROOT.rglob("*.py")}


def _cycle(g: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for d in sorted(g.get(m, ())):
            if d.endswith("__init__") or d not in g:
                continue
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state and (c := visit(d)):
                return c
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(g):
        if m not in state and (c := visit(m)):
            return c
    return None


def test_no_import_cycle_between_modules():
    g = {m: {d for d in deps if d != "graphpass"} for m, deps in _graph().items() if m != "graphpass"}
    assert _cycle(g) is None, " -> ".join(_cycle(g))


def test_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_folders_follow_the_data_flow():
    folders = {p.name for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert {"graph", "match", "calibrate", "passes", "search", "validate", "cli", "testing"} <= folders
    flat = sorted(p.name for p in ROOT.glob("*.py"))
    assert flat == ["__init__.py", "__main__.py", "errors.py", "pipeline.py", "progress.py"], flat


def test_python_m_graphpass_runs():
    r = subprocess.run([sys.executable, "-W", "error::ImportWarning", "-m", "graphpass", "--help"],
                       capture_output=True, text=True)
    assert r.returncode == 0 and "quantize" in r.stdout, r.stderr
