"""The layout's rules, checked on the source (ast, nothing imported): every module of the project's
packages (dca/, pipeline/, evaluation/, jobs/) keeps to them.

(a) No private name crosses a module boundary: no `from X import _name` and no `X._name` on a
    project module X (a name starting with one underscore is its module's own; what two modules
    share is public and named for what it does). Dunder names (`__version__`) are not private.
(b) No import cycles between project modules, counting every import: those at module level and
    those inside functions alike. A lazy import (inside a function) cannot deadlock an import, and
    the code uses them on purpose to keep torch, transformers and ray out of driver processes; but
    two modules that import each other, even lazily, still need each other: neither can be
    understood, tested or moved alone (pipeline/job.py and pipeline/ray_data_job.py were such a
    pair, joined by a lazy import). Laziness is for third-party weight, not for project circles.
(c) Imports flow one way: jobs -> evaluation -> pipeline -> dca. dca imports none of the others,
    pipeline neither jobs nor evaluation, evaluation not jobs.

Importing a package runs its __init__, so `import pipeline.engine.pool` also depends on
`pipeline` and `pipeline.engine`; the cycle check includes those edges.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("dca", "pipeline", "evaluation", "jobs")
# Which project packages each package may import (rule c).
ALLOWED = {
    "dca": {"dca"},
    "pipeline": {"pipeline", "dca"},
    "evaluation": {"evaluation", "pipeline", "dca"},
    "jobs": {"jobs", "evaluation", "pipeline", "dca"},
}


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the project's packages."""
    out = {}
    for package in PACKAGES:
        root = REPO / package
        if not root.is_dir():
            continue
        for path in sorted(root.rglob("*.py")):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


MODULES = _modules()


def _is_package(module: str) -> bool:
    return MODULES[module].name == "__init__.py"


def _project(name: str) -> bool:
    return name.split(".")[0] in PACKAGES


def _resolve(module: str, node: ast.ImportFrom) -> str:
    """The absolute module an ImportFrom names (relative imports resolved against `module`)."""
    if not node.level:
        return node.module or ""
    base = module.split(".") if _is_package(module) else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


class _Imports(ast.NodeVisitor):
    """Every import of one module: (imported module, line, at module level), the names bound to
    project modules, and private names taken from other project modules."""

    def __init__(self, module: str) -> None:
        self.module = module
        self.depth = 0  # > 0 inside a function (or lambda): a lazy import
        self.imports: list[tuple[str, int, bool]] = []
        self.module_names: dict[str, str] = {}  # local name -> project module it is bound to
        self.private: list[str] = []

    def _scoped(self, node) -> None:
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _scoped

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            if not _project(alias.name):
                continue
            self.imports.append((alias.name, node.lineno, self.depth == 0))
            if alias.asname:
                self.module_names[alias.asname] = alias.name
            else:  # `import a.b.c` binds `a`; a.b.c is reached by attributes
                self.module_names[alias.name.split(".")[0]] = alias.name.split(".")[0]

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        source = _resolve(self.module, node)
        if not _project(source):
            return
        for alias in node.names:
            full = f"{source}.{alias.name}"
            if full in MODULES:  # `from package import module`
                self.imports.append((full, node.lineno, self.depth == 0))
                self.module_names[alias.asname or alias.name] = full
            else:
                self.imports.append((source, node.lineno, self.depth == 0))
                if _private(alias.name) and source != self.module:
                    self.private.append(f"line {node.lineno}: from {source} import {alias.name}")

    def visit_Attribute(self, node: ast.Attribute) -> None:
        target = self._module_of(node.value)
        if target is not None and target != self.module and _private(node.attr):
            self.private.append(f"line {node.lineno}: {target}.{node.attr}")
        self.generic_visit(node)

    def _module_of(self, node) -> str | None:
        """The project module an expression names (`replica`, `pipeline.engine.replica`), or None."""
        if isinstance(node, ast.Name):
            return self.module_names.get(node.id)
        if isinstance(node, ast.Attribute):
            base = self._module_of(node.value)
            if base is not None and f"{base}.{node.attr}" in MODULES:
                return f"{base}.{node.attr}"
        return None


def _scan(module: str) -> _Imports:
    visitor = _Imports(module)
    visitor.visit(ast.parse(MODULES[module].read_text(encoding="utf-8"), filename=str(MODULES[module])))
    return visitor


SCANS = {module: _scan(module) for module in MODULES}


def _known(name: str) -> str | None:
    """The project module an imported name lives in: itself, or the nearest package above."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _with_parents(name: str) -> list[str]:
    """Importing a.b.c runs a/__init__, a/b/__init__, then a/b/c."""
    parts = name.split(".")
    return [m for m in (".".join(parts[:i]) for i in range(1, len(parts) + 1)) if m in MODULES]


def test_every_project_package_is_scanned():
    assert {m.split(".")[0] for m in MODULES} >= {"dca", "pipeline", "jobs"}
    assert len(MODULES) > 30


def test_no_private_name_is_imported_from_another_module():
    found = [f"{module}: {item}" for module, scan in SCANS.items() for item in scan.private]
    assert not found, "private names used across modules (make them public, named for what they do):\n  " + \
        "\n  ".join(found)


def _backward(scans: dict) -> list[str]:
    wrong = []
    for module, scan in scans.items():
        package = module.split(".")[0]
        for name, line, _ in scan.imports:
            if name.split(".")[0] not in ALLOWED[package]:
                wrong.append(f"{module} line {line} imports {name}")
    return wrong


def test_imports_flow_one_way():
    wrong = _backward(SCANS)
    assert not wrong, "imports against the direction jobs -> evaluation -> pipeline -> dca:\n  " + "\n  ".join(wrong)


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for module, scan in SCANS.items():
        for name, _, _ in scan.imports:  # module-level and lazy imports alike (rule b)
            known = _known(name)
            if known is None:
                continue
            for target in _with_parents(known):
                # A module importing its own package's __init__ (which is running, or done) is no edge.
                if target != module and not (module.startswith(target + ".") and _is_package(target)):
                    graph[module].add(target)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each strongly connected component of more than one module (Tarjan)."""
    index, low, stack, on_stack, components = {}, {}, [], set(), []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return components


def test_no_import_cycles_between_modules():
    cycles = _cycles(_graph())
    assert not cycles, "import cycles (module-level or lazy):\n  " + "\n  ".join(" <-> ".join(c) for c in cycles)


# --------------------------------------------------------------------------------------------
# The checker itself: each rule fails on a small example.


def _scan_source(module: str, source: str) -> _Imports:
    visitor = _Imports(module)
    visitor.visit(ast.parse(source))
    return visitor


@pytest.mark.parametrize("source", [
    "from pipeline.engine.replica import _Replica",
    "from pipeline.engine import replica as r\nr._short(None)",
    "import pipeline.engine.replica\npipeline.engine.replica._short(None)",
    "def f():\n    from pipeline.engine.replica import _short",
])
def test_the_checker_finds_private_names(source):
    if "pipeline.engine.replica" not in MODULES:
        pytest.skip("example module moved")
    assert _scan_source("pipeline.job", source).private


def test_the_checker_allows_a_modules_own_private_names_and_dunders():
    assert not _scan_source("pipeline.job", "from pipeline.job import _x\nimport pipeline\npipeline.__doc__").private


def test_the_checker_finds_cycles_and_sees_lazy_imports():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
    lazy = _scan_source("pipeline.job", "def f():\n    import pipeline.job\n")
    assert lazy.imports == [("pipeline.job", 2, False)]


@pytest.mark.parametrize("module, source", [
    ("pipeline.job", "def f():\n    from jobs.common import report"),
    ("dca.hf", "import pipeline.job"),
    ("pipeline.job", "from evaluation import run_evaluation"),
    ("evaluation.run", "from jobs import evaluate"),
])
def test_the_checker_finds_imports_against_the_flow(module, source):
    assert _backward({module: _scan_source(module, source)})


def test_the_checker_allows_imports_with_the_flow():
    assert not _backward({"jobs.common": _scan_source("jobs.common", "from pipeline.job import run_job"),
                          "evaluation.run": _scan_source("evaluation.run", "import dca")})


def test_the_planners_attention_backends_are_dcas():
    # pipeline.config.resolve writes the list out so that the driver imports nothing of dca.
    from dca.config import BACKENDS
    from pipeline.config.resolve import ATTENTION_BACKENDS

    assert ATTENTION_BACKENDS == tuple(name for name in BACKENDS if name != "auto")
