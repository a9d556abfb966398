"""No import cycles inside mae_fast, counting the imports made inside functions.

The graph is read from the source with ``ast``: every module of the installed tree (``mae_fast/``, and
``kernels/``, installed as ``mae_fast.kernels``), every import of a ``mae_fast`` module at any depth
(module level, functions, ``if TYPE_CHECKING:`` blocks), relative imports resolved. Edge rules:

* ``import a.b.c`` -> ``a.b.c``;
* ``from a.b import x`` -> ``a.b.x`` when that is a module, else ``a.b`` (the package's ``__init__``);
* the implicit initialisation of the parent packages of an imported module is not an edge (otherwise every
  ``from mae_fast import x`` inside mae_fast would be a cycle through ``mae_fast/__init__``), and neither
  is a module importing names from itself;
* ``importlib.import_module("...")`` / ``__import__("...")`` with a literal name count as imports, and so
  do the subcommand modules that ``mae_fast.cli`` imports by name from its table.

Only mae_fast-internal edges count; third-party imports are irrelevant here.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# source folder -> the package it is installed as (setup.py's package_dir)
SOURCE_ROOTS = {"mae_fast": REPO / "mae_fast", "mae_fast.kernels": REPO / "kernels"}
# compiled by setup.py from csrc/: a module without Python source, importing nothing of mae_fast
EXTENSION_MODULES = {"mae_fast._C"}
MAX_CYCLES_LISTED = 200


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    location: str  # path:line
    scope: str  # "module level", "in f", "in Class.method", ...

    @property
    def where(self) -> str:
        return f"{self.location} ({self.scope})"


@dataclass(frozen=True)
class Module:
    name: str
    path: Path
    is_package: bool


def discover_modules() -> dict[str, Module]:
    modules = {}
    for package, root in SOURCE_ROOTS.items():
        for path in sorted(root.rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            if is_package:
                parts = parts[:-1]
            name = ".".join([package, *parts])
            modules[name] = Module(name, path, is_package)
    return modules


def _is_internal(name: str) -> bool:
    return name == "mae_fast" or name.startswith("mae_fast.")


def _known(name: str, modules: dict[str, Module]) -> bool:
    return name in modules or name in EXTENSION_MODULES


def _resolve_relative(module: Module, level: int, target: str | None) -> str:
    package = module.name if module.is_package else module.name.rpartition(".")[0]
    parts = package.split(".")
    if level > len(parts):
        raise ImportError(f"{module.path}: relative import beyond the top-level package")
    base = ".".join(parts[: len(parts) - (level - 1)])
    return f"{base}.{target}" if target else base


def _enclosing_functions(tree: ast.AST) -> dict[ast.AST, str]:
    """Each node -> the name of the innermost function or class it sits in ("module level" when none)."""
    scope = {}

    def visit(node: ast.AST, name: str) -> None:
        for child in ast.iter_child_nodes(node):
            inner = name
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                inner = f"in {child.name}" if name == "module level" else f"{name}.{child.name}"
            scope[child] = inner
            visit(child, inner)

    visit(tree, "module level")
    return scope


def _literal_import_call(node: ast.Call) -> str | None:
    """The module name of ``importlib.import_module("x")`` / ``__import__("x")`` with a literal name."""
    func = node.func
    named = (isinstance(func, ast.Attribute) and func.attr == "import_module") or (
        isinstance(func, ast.Name) and func.id in ("import_module", "__import__")
    )
    if named and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
        return node.args[0].value
    return None


def imports_of(module: Module, modules: dict[str, Module], source: str | None = None) -> list[Edge]:
    """Every mae_fast-internal import edge of ``module`` (its file, or ``source``), at any depth."""
    tree = ast.parse(module.path.read_text() if source is None else source, filename=str(module.path))
    scope = _enclosing_functions(tree)
    targets: list[tuple[str, ast.AST]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets += [(alias.name, node) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve_relative(module, node.level, node.module) if node.level else node.module
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                targets.append((submodule if _known(submodule, modules) else base, node))
        elif isinstance(node, ast.Call) and (name := _literal_import_call(node)) is not None:
            targets.append((name, node))
    edges = []
    for target, node in targets:
        if not _is_internal(target) or target == module.name:
            continue
        location = f"{module.path.relative_to(REPO)}:{node.lineno}"
        edges.append(Edge(module.name, target, location, scope.get(node, "module level")))
    return edges


def cli_subcommand_modules(modules: dict[str, Module]) -> set[str]:
    """The module names of ``mae_fast.cli.SUBCOMMANDS``, read from the source (importing mae_fast is not needed)."""
    for node in ast.parse(modules["mae_fast.cli"].path.read_text()).body:
        targets = node.targets if isinstance(node, ast.Assign) else []
        if any(isinstance(target, ast.Name) and target.id == "SUBCOMMANDS" for target in targets):
            return {module for module, _ in ast.literal_eval(node.value).values()}
    raise AssertionError("mae_fast/cli.py has no SUBCOMMANDS table")


def _cli_subcommand_edges(modules: dict[str, Module]) -> list[Edge]:
    location = str(modules["mae_fast.cli"].path.relative_to(REPO))
    names = sorted(cli_subcommand_modules(modules))
    return [Edge("mae_fast.cli", name, location, "in main, by name") for name in names]


def import_graph() -> tuple[dict[str, Module], list[Edge]]:
    modules = discover_modules()
    edges = [edge for module in modules.values() for edge in imports_of(module, modules)]
    return modules, edges + _cli_subcommand_edges(modules)


def strongly_connected_components(nodes, successors: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm (iterative); components in no particular order, members sorted."""
    index, low, on_stack, stack, components = {}, {}, set(), [], []
    counter = 0
    for root in sorted(nodes):
        if root in index:
            continue
        work = [(root, iter(sorted(successors.get(root, ()))))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(successors.get(child, ())))))
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
                components.append(sorted(component))
    return components


def _cycles_from(start: str, allowed: set[str], successors: dict[str, set[str]], cycles: list, limit: int) -> None:
    """Append the elementary cycles through ``start`` that use only ``allowed`` modules (depth-first)."""
    path = [start]
    pending = [iter(sorted(successors.get(start, ())))]
    while pending and len(cycles) < limit:
        child = next(pending[-1], None)
        if child is None:
            pending.pop()
            path.pop()
        elif child == start:
            cycles.append([*path, start])
        elif child in allowed and child not in path:
            path.append(child)
            pending.append(iter(sorted(successors.get(child, ()))))


def simple_cycles(successors: dict[str, set[str]], limit: int = MAX_CYCLES_LISTED) -> list[list[str]]:
    """The elementary cycles of the graph (each once, starting at its smallest module), up to ``limit``."""
    cycles: list[list[str]] = []
    for component in strongly_connected_components(successors, successors):
        for start in component if len(component) > 1 else ():
            _cycles_from(start, {m for m in component if m > start}, successors, cycles, limit)
    return cycles


def describe(cycle: list[str], edges: list[Edge]) -> str:
    hops = []
    for source, target in zip(cycle, cycle[1:], strict=False):
        where = "; ".join(dict.fromkeys(e.where for e in edges if e.source == source and e.target == target))
        hops.append(f"    {source} -> {target}   [{where}]")
    return " -> ".join(cycle) + "\n" + "\n".join(hops)


def _successors(edges: list[Edge]) -> dict[str, set[str]]:
    successors: dict[str, set[str]] = {}
    for edge in edges:
        successors.setdefault(edge.source, set()).add(edge.target)
    return successors


# --- the tests -------------------------------------------------------------------------------------------


def test_every_internal_import_names_an_existing_module():
    modules, edges = import_graph()
    unknown = [f"{e.target}   [{e.where}]" for e in edges if not _known(e.target, modules)]
    assert not unknown, "imports of mae_fast modules that do not exist:\n" + "\n".join(unknown)


def test_the_edge_rules():
    modules = discover_modules()
    here = Module("mae_fast.train.loop", REPO / "mae_fast" / "train" / "loop.py", is_package=False)
    source = """
import os
import torch.nn
import mae_fast.ops.loss
from mae_fast import dispatch, __version__
from mae_fast.train import data, TrainConfig
from . import config
from .. import models
from ..models import create_model
from .loop import pretrain
from typing import TYPE_CHECKING
if TYPE_CHECKING:
    from mae_fast.nn import vit
def f():
    from mae_fast import _C
    class Inner:
        def g(self):
            return importlib.import_module("mae_fast.info"), __import__("numpy")
"""
    edges = [(e.target, e.scope) for e in imports_of(here, modules, source)]
    assert edges == [
        ("mae_fast.ops.loss", "module level"),  # the module itself; its parents' __init__ are no edge
        ("mae_fast.dispatch", "module level"),  # a submodule, by its name
        ("mae_fast", "module level"),  # a name of the package's __init__
        ("mae_fast.train.data", "module level"),
        ("mae_fast.train", "module level"),
        ("mae_fast.train.config", "module level"),  # relative imports, resolved
        ("mae_fast.models", "module level"),
        ("mae_fast.models", "module level"),
        ("mae_fast.nn.vit", "module level"),  # under TYPE_CHECKING too
        ("mae_fast._C", "in f"),  # the compiled extension, a module of its own
        ("mae_fast.info", "in f.Inner.g"),  # import_module with a literal name
    ]  # "from .loop import pretrain" in loop itself imports nothing new: no self-edge
    package = Module("mae_fast.train", REPO / "mae_fast" / "train" / "__init__.py", is_package=True)
    assert [e.target for e in imports_of(package, modules, "from .loop import pretrain")] == ["mae_fast.train.loop"]


def test_the_graph_sees_the_whole_installed_tree():
    modules, edges = import_graph()
    assert {"mae_fast", "mae_fast.cli", "mae_fast.train.loop", "mae_fast.kernels", "mae_fast.kernels.attention"} <= set(
        modules
    )
    assert modules["mae_fast.kernels"].path == REPO / "kernels" / "__init__.py"
    pairs = {(e.source, e.target, e.scope) for e in edges}
    assert ("mae_fast.train.loop", "mae_fast.train.runmodel", "module level") in pairs
    assert ("mae_fast.train.cli", "mae_fast.train.eval", "in _demo_knn") in pairs
    assert ("mae_fast.cli", "mae_fast.bench", "in main, by name") in pairs
    assert "mae_fast._C" in EXTENSION_MODULES and '"mae_fast._C"' in (REPO / "setup.py").read_text()


def test_the_cycle_finder_lists_every_cycle():
    successors = {"a": {"b"}, "b": {"c", "a"}, "c": {"a"}, "d": {"a"}, "e": {"f"}, "f": {"e"}}
    assert sorted(simple_cycles(successors)) == [["a", "b", "a"], ["a", "b", "c", "a"], ["e", "f", "e"]]


def test_no_import_cycles():
    _, edges = import_graph()
    cycles = simple_cycles(_successors(edges))
    listed = "\n".join(describe(cycle, edges) for cycle in cycles)
    assert not cycles, f"{len(cycles)} import cycle(s) inside mae_fast:\n{listed}"


def test_cli_imports_no_subcommand_module_at_module_level():
    modules = discover_modules()
    subcommands = cli_subcommand_modules(modules)
    assert {"mae_fast.info", "mae_fast.bench", "mae_fast.train.cli"} <= subcommands
    at_module_level = {e.target for e in imports_of(modules["mae_fast.cli"], modules) if e.scope == "module level"}
    assert not at_module_level & subcommands, at_module_level
    assert not at_module_level, f"mae_fast.cli imports {sorted(at_module_level)} at module level"
