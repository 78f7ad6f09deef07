"""The import graph of terdit/: no cycles, the model layer imports nothing above it, no module imports the root
package, a short top level. Read from the source (every import statement, function-local ones included), so a
lazy import cannot hide a cycle; nothing is imported."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "terdit"
ROOT = "terdit"
# The lower layers (issue 15's layering): they may import errors / io / extras / distributed / defaults and each
# other as the layering allows, never these.
LOWER = ("terdit.models", "terdit.quant", "terdit.diffusion")
ABOVE_LOWER = tuple(f"terdit.{p}" for p in ("deploy", "loading", "sampling", "training", "experiments", "cli",
                                           "data", "eval"))
MAX_TOP_LEVEL_MODULES = 6


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@lru_cache(maxsize=1)
def modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


@lru_cache(maxsize=1)
def import_nodes() -> dict[str, list[ast.Import | ast.ImportFrom]]:
    """Every import statement of every module (at any depth), parsed once for all the tests here."""
    return {m: [n for n in ast.walk(ast.parse(p.read_text(encoding="utf-8"), filename=str(p)))
                if isinstance(n, (ast.Import, ast.ImportFrom))] for m, p in modules().items()}


def _imported(node: ast.AST, module: str, is_package: bool) -> Iterator[tuple[str, int]]:
    """(name, line) of what one import statement names: `import a.b` -> a.b; `from a import b` -> a and, when b is
    a module, a.b; relative imports resolved against `module`."""
    if isinstance(node, ast.Import):
        for alias in node.names:
            yield alias.name, node.lineno
    elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
            package = module.split(".") if is_package else module.split(".")[:-1]
            anchor = package[: len(package) - node.level + 1]
            base = ".".join(anchor + ([base] if base else []))
        yield base, node.lineno
        for alias in node.names:
            yield f"{base}.{alias.name}", node.lineno


@lru_cache(maxsize=1)
def import_edges() -> dict[str, dict[str, int]]:
    """module -> {imported terdit module: first line}, over every import statement in the module."""
    mods = modules()
    edges: dict[str, dict[str, int]] = {m: {} for m in mods}
    for module, path in mods.items():
        for node in import_nodes()[module]:
            for name, line in _imported(node, module, path.name == "__init__.py"):
                if name in mods and name != module:
                    edges[module].setdefault(name, line)
    return edges


def root_imports() -> list[str]:
    """`import terdit` / `from terdit import X` (or a relative import of the root) inside the package."""
    found = []
    for module, path in modules().items():
        if module == ROOT:
            continue
        for node in import_nodes()[module]:
            names = [(n, line) for n, line in _imported(node, module, path.name == "__init__.py")]
            plain = isinstance(node, ast.Import) and any(a.name == ROOT for a in node.names)
            from_root = isinstance(node, ast.ImportFrom) and names and names[0][0] == ROOT
            if plain or from_root:
                found.append(f"{module}:{node.lineno}")
    return found


def cycles(edges: dict[str, dict[str, int]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in edges:
        if start in index:
            continue
        work = [(start, iter(edges[start]))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(edges[child])))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def _within(module: str, packages: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def _describe(component: list[str], edges: dict[str, dict[str, int]]) -> str:
    inside = set(component)
    links = [f"{a} -> {b} (line {line})" for a in component for b, line in sorted(edges[a].items()) if b in inside]
    return f"{len(component)} modules: {', '.join(component)}\n    " + "\n    ".join(links)


def test_the_walker_sees_every_kind_of_import():
    """Function-local, `from a import submodule`, relative and dotted imports all become edges."""
    tree = ast.parse("def f():\n    from terdit.models import runs\n    from . import kinds\n"
                     "    from .open import open_model\n    import terdit.deploy.format\n")
    names = {n for node in ast.walk(tree) for n, _ in _imported(node, "terdit.loading.hub", False)}
    assert {"terdit.models", "terdit.models.runs", "terdit.loading", "terdit.loading.kinds", "terdit.loading.open",
            "terdit.deploy.format"} <= names
    assert cycles({"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}, "d": {"a": 1}}) == [["a", "b", "c"]]
    assert {"terdit.models.terdit", "terdit.loading.open", "terdit.quant.ternary"} <= set(modules())


def test_no_import_cycle():
    edges = import_edges()
    found = cycles(edges)
    assert not found, "import cycles in terdit/:\n" + "\n".join(_describe(c, edges) for c in found)


def test_the_model_layer_imports_nothing_above_it():
    edges = import_edges()
    bad = [f"{m} -> {target} (line {line})" for m in edges if _within(m, LOWER)
           for target, line in sorted(edges[m].items()) if _within(target, ABOVE_LOWER)]
    assert not bad, "models / quant / diffusion import from higher layers:\n  " + "\n  ".join(bad)


def test_no_module_imports_the_root_package():
    """The root package is the public API (it imports everything); inside terdit/ use the submodule's path."""
    assert not root_imports(), f"`import terdit` / `from terdit import ...` in: {root_imports()}"


def test_the_top_level_stays_short():
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= MAX_TOP_LEVEL_MODULES, f"{len(top)} modules directly in terdit/: {top}"


def _code_strings(tree: ast.Module) -> Iterator[ast.Constant]:
    """String constants of a module that are not docstrings."""
    docs = {id(n.body[0].value) for n in ast.walk(tree)
            if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
            and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
            yield node


def test_one_module_tells_the_layouts_apart():
    """The file names that distinguish a release, a pipeline folder and a run folder are written in
    terdit/models/kinds.py only: every other module asks `kind_of` (issue 15: opening decided once)."""
    markers = {"model_args.pth", "model_index.json", "checkpoints"}
    found = sorted(f"{name}:{node.lineno} {node.value!r}" for name, path in modules().items()
                   for node in _code_strings(ast.parse(path.read_text())) if node.value in markers)
    assert found and all(hit.startswith("terdit.models.kinds:") for hit in found), found
