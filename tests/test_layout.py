"""The package's layering (DESIGN.md): formats and config at the bottom; engines, data,
checkpoint, tokenizer above them; run settings, the model loader, the logger and
distribution; the training loop on top with sample, evals and export beside it. No module
imports one of a higher layer, and there is no import circle, counting the imports inside
functions too (a lazy import is still a dependency)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "llmpy"

# module (or package prefix) -> layer; the longest matching prefix decides.
LAYERS = {
    "llmpy.errors": 0, "llmpy.config": 0, "llmpy.formats": 0,
    "llmpy.init": 1, "llmpy.schedulers": 1, "llmpy.tokenizer": 1, "llmpy.checkpoint": 1,
    "llmpy.engines": 1, "llmpy.data": 1, "llmpy.hf": 1, "llmpy.plot": 1,
    "llmpy.outlier_detector": 1, "llmpy.mfu": 1, "llmpy.logger": 1, "llmpy.preempt": 1,
    "llmpy.settings": 2, "llmpy.models": 2, "llmpy.dist": 2, "llmpy.run_dir": 2,
    "llmpy.progress": 2,
    "llmpy.train": 3, "llmpy.sample": 3, "llmpy.evals": 3, "llmpy.export": 3,
    "llmpy.data.cli": 3,  # `llmpy data`: a command, beside train
    "llmpy.cli": 4, "llmpy.__main__": 4, "llmpy": 4,
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def layer(mod: str) -> int:
    best = max((k for k in LAYERS if mod == k or mod.startswith(k + ".")), key=len)
    return LAYERS[best]


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """llmpy modules imported anywhere in the file (relative imports resolved)."""
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")
                up = up[:len(up) - (node.level - 1)]
                base = ".".join(up + ([base] if base else []))
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        for n in names:
            while n and n not in modules:
                n = n.rpartition(".")[0]
            if n and n != me:
                found.add(n)
    return found


def graph() -> dict[str, set[str]]:
    files = sorted(PKG.rglob("*.py"))
    modules = {module_name(f) for f in files}
    return {module_name(f): imports_of(f, modules) for f in files}


def test_no_module_imports_a_higher_layer():
    bad = [f"{m} (layer {layer(m)}) imports {d} (layer {layer(d)})"
           for m, deps in graph().items() for d in sorted(deps)
           if layer(d) > layer(m) and not m.startswith(d + ".")]  # a package's own __init__
    assert not bad, "\n".join(bad)


def test_no_import_circle():
    g = graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for d in sorted(g.get(m, ())):
            if m.startswith(d + "."):  # importing from one's own package __init__
                continue
            if state.get(d) == 1:
                pytest.fail("import circle: " + " -> ".join(stack[stack.index(d):] + [d]))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m)


def test_training_loop_reads_in_one_sitting():
    """Issue 12: train.py under 400 lines, no function much over 80."""
    src = (PKG / "train.py").read_text()
    assert len(src.splitlines()) < 400
    long = [(n.name, n.end_lineno - n.lineno + 1) for n in ast.walk(ast.parse(src))
            if isinstance(n, ast.FunctionDef) and n.end_lineno - n.lineno + 1 > 80]
    assert not long, long
