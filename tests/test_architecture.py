"""The layers of docs/concepts/architecture.md, checked on the source: every module of the package
imports only from its own layer or the layers below, and the module-level imports have no cycle.

Imports are read with ``ast`` (nothing is imported), in three kinds: module-level statements
(run when the module is imported), imports inside functions (lazy: run on first use), and
module names handed to ``importlib.import_module`` by a module-level table (lazy aliases). The
layer rule holds for all three, except for the lazy edges listed in ``ALLOWED_LAZY_UPWARD``,
each with the reason it is allowed.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# lowest first; a module may import from its own layer and any layer before it
LAYERS = ("kernels", "support", "losses", "products", "operators", "solvers", "integrations")

# module-name prefixes per layer (the longest matching prefix wins; see layer_of)
LAYER_OF_PREFIX = {
    "torch_linop.kernels": "kernels",
    # helpers with no curvature concept: the data loop's batches, parameter selection, autodiff
    # and context helpers, warnings, finite-difference steps, CUDA-graph capture
    "torch_linop.data": "support",
    "torch_linop.params": "support",
    "torch_linop._autodiff": "support",
    "torch_linop._checks": "support",
    "torch_linop._context": "support",
    "torch_linop._cuda_graph": "support",
    "torch_linop._finite_difference": "support",
    "torch_linop._nondeterminism": "support",
    "torch_linop._unreliable_derivatives": "support",
    "torch_linop._warnings": "support",
    "torch_linop.losses": "losses",
    "torch_linop.products": "products",
    # process-group reductions, rank-consistent seeds and the sharded vector space
    "torch_linop.data_parallel": "products",
    "torch_linop.distributed": "products",
    "torch_linop.options": "products",
    "torch_linop.linear_operator": "operators",
    "torch_linop.algebra": "operators",
    "torch_linop.operator": "operators",
    "torch_linop._graph_cache": "operators",
    "torch_linop.hessian": "operators",
    "torch_linop.ggn": "operators",
    "torch_linop.empirical_fisher": "operators",
    "torch_linop.mc_fisher": "operators",
    "torch_linop.reference": "operators",
    "torch_linop.kfac": "operators",
    "torch_linop.distributed.fsdp": "operators",
    "torch_linop.distributed.fsdp_forward_ad": "operators",
    "torch_linop.solvers": "solvers",
    # analyses that run solvers on operators, and everything a user reaches from outside
    "torch_linop.kfac.quality": "integrations",
    "torch_linop.cli": "integrations",
    "torch_linop.curvlinops": "integrations",
    "torch_linop.monitor": "integrations",
    # the memory planner rehearses the operators' products on the meta device
    "torch_linop.planning": "integrations",
    "torch_linop.__main__": "integrations",
    # the package's own __init__, the public face that re-exports every layer (importing it
    # imports them all, so only integrations may)
    "torch_linop": "integrations",
}
FACADE = "torch_linop"

# (importer, imported) lazy edges that go upward, each allowed for the reason given
ALLOWED_LAZY_UPWARD = {
    # the names earlier versions documented for the solvers on sharded vectors
    # (sharded_lanczos, ...) are aliases of the solvers, resolved on first access
    ("torch_linop.distributed", "torch_linop.solvers"): "documented aliases of the solvers",
    # FSDPHessianOperator & co. are re-exported from the package but imported on first access:
    # torch.distributed.fsdp takes about a second to import
    ("torch_linop.distributed", "torch_linop.distributed.fsdp"): "lazy re-export (import time)",
    # approximation_quality is re-exported from torch_linop.kfac, resolved on first access so
    # that importing the KFAC operators does not import the solvers
    ("torch_linop.kfac", "torch_linop.kfac.quality"): "lazy re-export of an analysis",
}


def package_modules() -> dict[str, Path]:
    """Every module of the package by dotted name (kernels/ and solvers/ are linked into it)."""
    modules: dict[str, Path] = {}
    for folder, prefix in (
        (ROOT / "torch_linop", ("torch_linop",)),
        (ROOT / "kernels", ("torch_linop", "kernels")),
        (ROOT / "solvers", ("torch_linop", "solvers")),
    ):
        for path in sorted(folder.rglob("*.py")):
            relative = path.relative_to(folder)
            if folder.name == "torch_linop" and relative.parts[0] in ("kernels", "solvers"):
                continue  # the links: read from the real folders above
            parts = (*prefix, *relative.with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(parts)] = path
    return modules


MODULES = package_modules()


@dataclass(frozen=True)
class Import:
    importer: str
    imported: str
    line: int
    lazy: bool  # inside a function, or a name handed to importlib.import_module


def resolve(name: str) -> str | None:
    """The package module ``name`` refers to (itself, or the module holding the attribute)."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def eager_statements(tree: ast.Module) -> set[int]:
    """ids of the import statements that run when the module is imported: at module level or
    in module-level if/try/with blocks, except under ``if TYPE_CHECKING:``."""
    eager: set[int] = set()

    def visit(statements: list[ast.stmt]) -> None:
        for statement in statements:
            if isinstance(statement, ast.Import | ast.ImportFrom):
                eager.add(id(statement))
            elif isinstance(statement, ast.If):
                if "TYPE_CHECKING" not in ast.unparse(statement.test):
                    visit(statement.body)
                visit(statement.orelse)
            elif isinstance(statement, ast.Try):
                visit(statement.body)
                for handler in statement.handlers:
                    visit(handler.body)
                visit(statement.orelse)
                visit(statement.finalbody)
            elif isinstance(statement, ast.With):
                visit(statement.body)

    visit(tree.body)
    return eager


def imports_of(module: str) -> list[Import]:
    """The package modules ``module`` imports, with line and kind (see :class:`Import`)."""
    path = MODULES[module]
    source = path.read_text()
    tree = ast.parse(source, filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    eager = eager_statements(tree)
    found: list[Import] = []

    def add(target: str, node: ast.AST, lazy: bool) -> None:
        resolved = resolve(target)
        if resolved is not None and resolved != module:
            found.append(Import(module, resolved, getattr(node, "lineno", 0), lazy))

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node, lazy=id(node) not in eager)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: anchored at this module's package
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                target = submodule if submodule in MODULES else base
                add(target, node, lazy=id(node) not in eager)
        elif (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and node.value in MODULES
            and "import_module" in source
        ):
            # a lazy table, {"name": ("torch_linop.module", "attribute")}, that a module-level
            # __getattr__ hands to importlib.import_module
            add(node.value, node, lazy=True)
    return found


def layer_of(module: str) -> str:
    """The layer of a module: that of its longest prefix in LAYER_OF_PREFIX."""
    name = module
    while name:
        if name in LAYER_OF_PREFIX:
            return LAYER_OF_PREFIX[name]
        name = name.rpartition(".")[0]
    raise AssertionError(
        f"{module} has no layer: add it (or its package) to LAYER_OF_PREFIX in "
        "tests/test_architecture.py and to docs/concepts/architecture.md"
    )


IMPORTS = [found for module in MODULES for found in imports_of(module)]


def is_upward(edge: Import) -> bool:
    if edge.importer == FACADE:
        return False
    return LAYERS.index(layer_of(edge.imported)) > LAYERS.index(layer_of(edge.importer))


def describe(edge: Import) -> str:
    return (
        f"{edge.importer} ({layer_of(edge.importer)}, line {edge.line}) imports "
        f"{edge.imported} ({layer_of(edge.imported)})"
    )


def test_the_reader_sees_the_imports_it_should():
    """The parser finds a known module-level import, a known lazy import, and the lazy table of
    torch_linop.distributed (so the checks below do not pass on an empty graph)."""
    edges = {(e.importer, e.imported, e.lazy) for e in IMPORTS}
    assert ("torch_linop.hessian", "torch_linop.operator", False) not in edges  # via _graph_cache
    assert ("torch_linop._graph_cache", "torch_linop.operator", False) in edges
    assert ("torch_linop.linear_operator", "torch_linop.algebra", True) in edges
    assert ("torch_linop.distributed", "torch_linop.solvers", True) in edges
    assert len(MODULES) > 100 and len(IMPORTS) > 300


def test_every_module_has_a_layer():
    for module in MODULES:
        if module != FACADE:
            assert layer_of(module) in LAYERS


def test_module_level_imports_run_downward():
    upward = sorted({describe(e) for e in IMPORTS if not e.lazy and is_upward(e)})
    assert not upward, "imports against the layers:\n" + "\n".join(upward)


def test_lazy_imports_run_downward_except_the_documented_aliases():
    lazy_upward = {(e.importer, e.imported): e for e in IMPORTS if e.lazy and is_upward(e)}
    unexpected = sorted(
        describe(e) for key, e in lazy_upward.items() if key not in ALLOWED_LAZY_UPWARD
    )
    assert not unexpected, "lazy imports against the layers:\n" + "\n".join(unexpected)
    # an allowed exception that no longer exists should leave the list
    stale = sorted(set(ALLOWED_LAZY_UPWARD) - set(lazy_upward))
    assert not stale, f"allowed exceptions no longer in the code: {stale}"


def test_solvers_and_kernels_import_nothing_else_of_the_package():
    """Stronger than the layer rule: the solvers see only the operator protocol, the kernels
    hold no model code (each imports from its own package only, lazily or not)."""
    for package in ("torch_linop.solvers", "torch_linop.kernels"):
        outside = [
            describe(e)
            for e in IMPORTS
            if layer_of(e.importer) == layer_of(package)
            and layer_of(e.imported) != layer_of(package)
        ]
        assert not outside, f"{package} imports other parts of torch_linop:\n" + "\n".join(outside)


def test_the_base_operator_does_not_import_the_sharded_layer():
    """Data-parallel reduction is a product-level concern (torch_linop.data_parallel); the FSDP
    operators are built on top of the base operator, never imported by it."""
    for base in ("torch_linop.operator", "torch_linop.linear_operator", "torch_linop._graph_cache"):
        reached = {e.imported for e in IMPORTS if e.importer == base}
        assert not {m for m in reached if m.startswith("torch_linop.distributed.fsdp")}, reached


def test_no_module_imports_benchmarks_or_tests():
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = (
                [alias.name for alias in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom) and not node.level
                else []
            )
            for name in names:
                assert name.split(".")[0] not in ("benchmarks", "tests"), f"{module} imports {name}"


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the directed graph ``edges`` (as a path that returns to its start), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for successor in sorted(edges.get(node, ())):
            if state.get(successor) == 1:
                return path[path.index(successor) :] + [successor]
            if successor not in state:
                cycle = visit(successor)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


@pytest.mark.parametrize("granularity", ["module", "package"])
def test_no_import_cycle_at_module_level(granularity: str):
    """No cycle among module-level imports, between modules or between packages (a package is a
    module's parent: torch_linop.losses.base is in torch_linop.losses). The package's own
    __init__ (the public face, which imports every layer) is left out."""

    def node(module: str) -> str:
        if granularity == "module" or module.count(".") < 2:
            return module
        return module.rpartition(".")[0] if MODULES[module].name != "__init__.py" else module

    edges: dict[str, set[str]] = {}
    for e in IMPORTS:
        if e.lazy or FACADE in (e.importer, e.imported):
            continue
        source, target = node(e.importer), node(e.imported)
        if source != target:
            edges.setdefault(source, set()).add(target)
    assert find_cycle(edges) is None, f"import cycle: {' -> '.join(find_cycle(edges) or [])}"
