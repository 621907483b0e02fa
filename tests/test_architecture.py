"""The package's shape, as docs/ARCHITECTURE.md states it: layers that import one way, no import cycle, files and
functions readable in one sitting, imports inside functions only where they buy start-up time or an optional
dependency, and experiments apart from the product. (CI also runs ``lint-imports`` on pyproject.toml's contracts.)"""

from __future__ import annotations

import ast
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src" / "fakeprint"
LAYERS = ("core", "data", "features", "models", "engine", "reports", "studies", "interfaces")  # bottom to top
# third-party packages a function may import where it needs them: optional extras, or slow to import
# (torch and numpy only in core.versions, which the CLI imports for --version before anything else)
LAZY_OK = {"matplotlib", "onnx", "onnxruntime", "cleanlab", "fastapi", "uvicorn", "sklearn", "PIL", "safetensors",
           "torch", "numpy"}
MAX_FILE_LINES = 440
MAX_FUNCTION_LINES = 100


def _modules() -> dict[str, Path]:
    out = {}
    for p in sorted(SRC.rglob("*.py")):
        parts = p.relative_to(SRC.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


def _layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else None


def test_every_module_lives_in_a_layer():
    loose = [m for m in _modules() if m.count(".") >= 1 and _layer(m) is None
             and m not in ("fakeprint.__main__",) and not m.startswith(("fakeprint.static", "fakeprint.weights"))]
    assert loose == []


def test_no_module_imports_a_layer_above_its_own():
    graph = grimp.build_graph("fakeprint")
    upward = []
    for module in graph.modules:
        mine = _layer(module)
        for imported in graph.find_modules_directly_imported_by(module):
            theirs = _layer(imported)
            if mine is not None and theirs is not None and theirs > mine:
                upward.append(f"{module} -> {imported}")
    assert upward == []


def test_there_is_no_import_cycle():
    graph = grimp.build_graph("fakeprint")
    modules = sorted(m for m in graph.modules if m != "fakeprint")
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph.find_modules_directly_imported_by(v) - {"fakeprint"}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for m in modules:
        if m not in index:
            visit(m)
    assert cycles == []


@pytest.mark.parametrize("path", sorted(SRC.rglob("*.py")), ids=lambda p: str(p.relative_to(SRC)))
def test_files_and_functions_are_readable_in_one_sitting(path):
    text = path.read_text()
    assert len(text.splitlines()) <= MAX_FILE_LINES
    long = [(n.name, n.end_lineno - n.lineno + 1) for n in ast.walk(ast.parse(text))
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > MAX_FUNCTION_LINES]
    assert long == []


def test_imports_inside_functions_are_for_start_up_time_or_optional_packages_only():
    """Only the command modules (each imports what its command needs when it runs, so ``fakeprint --help`` is
    fast) and the package's ``load`` import inside functions freely; elsewhere a function may import only an
    optional or slow third-party package."""
    found = []
    for module, path in _modules().items():
        if module.startswith("fakeprint.interfaces.cli") or module == "fakeprint":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for inner in ast.walk(node):
                if isinstance(inner, ast.Import):
                    names = [a.name for a in inner.names]
                elif isinstance(inner, ast.ImportFrom) and inner.level == 0:
                    names = [inner.module or ""]
                else:
                    continue
                for name in names:
                    top = name.split(".")[0]
                    if top in LAZY_OK:
                        continue
                    found.append(f"{module}.{node.name}: {name}")
    assert sorted(set(found)) == []


def test_experiments_stay_apart_from_the_product_and_its_tests():
    users = [str(p.relative_to(ROOT)) for folder in (SRC, ROOT / "tests") for p in folder.rglob("*.py")
             if p != Path(__file__) and ("experiments" in p.read_text() and "sys.path" in p.read_text()
                                         or "import experiments" in p.read_text())]
    assert users == []
