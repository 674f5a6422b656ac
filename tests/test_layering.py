"""The import graph of layerzero: layered, without a circle.

Every `import` of every module is read with `ast` (module level and inside functions; only the
names under `if TYPE_CHECKING:` are left out: they never run). A module may import modules of its
own layer and of the layers below it, never above; and no chain of imports comes back to where it
started. Layers, bottom to top:

    core        the data model: kernel specs, contexts, reasons, errors, device facts
    backends    one module per kernel library (and the registry of them)
    components  what the Runtime composes: selection engine and plan cache, policy model and
                loading, PerfDB, the monitors (health, probes, memory, telemetry)
    runtime     state.py: the Runtime and the runtime object
    ops         the op families: the lz.* functions and everything each knows about its op
    api         calls that act on the runtime: inspection, policy calls, measuring and solving,
                capabilities, doctor, graphs, isolation, dispatch, distributed, ...
    top         the package namespace, integrations, serving, the CLI
"""

from __future__ import annotations

import ast
import fnmatch
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("core", ("layerzero.kernel", "layerzero.context", "layerzero.reasons", "layerzero.errors", "layerzero.device",
              "layerzero.frozen", "layerzero.capture", "layerzero.descriptors", "layerzero.version")),
    ("backends", ("layerzero.backends", "layerzero.backends.*")),
    ("components", ("layerzero.selection", "layerzero.selection.engine", "layerzero.selection.cache",
                    "layerzero.policy", "layerzero.policy.model", "layerzero.policy.conditions",
                    "layerzero.policy.loader", "layerzero.perf", "layerzero.perf.perfdb", "layerzero.monitor",
                    "layerzero.monitor.*")),
    ("runtime", ("layerzero.state",)),
    ("ops", ("layerzero.ops", "layerzero.ops.*")),
    ("api", ("layerzero.selection.inspect", "layerzero.policy.config", "layerzero.perf.*", "layerzero.capabilities",
             "layerzero.doctor", "layerzero.graphs", "layerzero.isolation", "layerzero.telemetry", "layerzero.dispatch",
             "layerzero.distributed", "layerzero.speculative", "layerzero.kv_cache", "layerzero.ringbuffer")),
    ("top", ("layerzero", "layerzero.__main__", "layerzero.cli", "layerzero.demo", "layerzero.serve",
             "layerzero.integrations", "layerzero.integrations.*")),
]


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted((SRC / "layerzero").rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def layer_of(module: str) -> int:
    """The index of the first layer with a pattern matching `module` (a package's own name before its glob)."""
    for index, (_, patterns) in enumerate(LAYERS):
        if module in patterns:
            return index
    for index, (_, patterns) in enumerate(LAYERS):
        if any(fnmatch.fnmatchcase(module, p) for p in patterns):
            return index
    raise AssertionError(f"{module} is in no layer: add it to LAYERS")


def _type_checking_blocks(tree: ast.AST) -> set[int]:
    """ids of the nodes under `if TYPE_CHECKING:`."""
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", getattr(node.test, "attr", None)) == "TYPE_CHECKING":
            skip.update(id(n) for child in node.body for n in ast.walk(child))
    return skip


def imports(known: dict[str, Path]) -> dict[str, set[tuple[str, int]]]:
    """module -> {(imported layerzero module, line)}."""
    out: dict[str, set[tuple[str, int]]] = {}
    for module, path in known.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        skip = _type_checking_blocks(tree)
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        found: set[tuple[str, int]] = set()
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                names = [f"{target}.{a.name}" if f"{target}.{a.name}" in known else target for a in node.names]
            else:
                continue
            for name in names:
                while name and name not in known:  # `import layerzero.ops.norm` names a module; keep the longest
                    name = name.rpartition(".")[0]
                if name.startswith("layerzero") and name != module:
                    found.add((name, node.lineno))
        out[module] = found
    return out


def test_every_module_has_a_layer():
    for module in modules():
        layer_of(module)


def test_no_module_imports_a_layer_above_its_own():
    known = modules()
    wrong = []
    for module, targets in imports(known).items():
        for target, line in sorted(targets):
            if layer_of(target) > layer_of(module):
                wrong.append(f"{known[module].relative_to(SRC)}:{line}: {module} ({LAYERS[layer_of(module)][0]}) "
                             f"imports {target} ({LAYERS[layer_of(target)][0]})")
    assert not wrong, "\n".join(wrong)


def test_nothing_below_the_ops_imports_the_runtime_object():
    ops = [name for name, _ in LAYERS].index("ops")
    users = [m for m, targets in imports(modules()).items()
             if layer_of(m) < ops and any(t == "layerzero.state" for t, _ in targets)]
    assert users == []


def test_the_import_graph_has_no_circle():
    graph = {m: {t for t, _ in targets} for m, targets in imports(modules()).items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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
                circles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert circles == []
