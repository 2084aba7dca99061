"""The code's direction, read from the source (AST): `blockskip.models` <- the shared contracts in
`src/blockskip` <- `blockskip.host`, `blockskip.edge`; host and edge never import each other (a
board installs no host code), and no import cycle anywhere. The applications on top (the CLI, the
demo) may import everything. The map with its arrows: DESIGN.md, "Architecture"."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"models": "blockskip.models", "host": "blockskip.host", "edge": "blockskip.edge",
           "src/blockskip": "blockskip"}
APPS = {"blockskip.cli", "blockskip.demo", "blockskip.demo_report", "blockskip.__main__"}
LEAVES = {"blockskip.errors"}  # imports nothing of the project; every layer may use it


def modules() -> dict[str, Path]:
    found = {}
    for folder, package in FOLDERS.items():
        for path in sorted((ROOT / folder).glob("*.py")):
            found[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return found


def imports(path: Path, known: set[str]) -> set[str]:
    """Project modules `path` imports, at module level or inside a function."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != "blockskip":
                out.add(name)
    return out


def layer(module: str) -> str:
    if module in APPS:
        return "app"
    if module in LEAVES:
        return "leaf"
    for package, name in (("blockskip.models", "models"), ("blockskip.host", "host"), ("blockskip.edge", "edge")):
        if module == package or module.startswith(package + "."):
            return name
    return "core"


ALLOWED = {"leaf": set(), "models": {"leaf", "models"}, "core": {"leaf", "models", "core"},
           "host": {"leaf", "models", "core", "host"}, "edge": {"leaf", "models", "core", "edge"},
           "app": {"leaf", "models", "core", "host", "edge", "app"}}


def graph() -> dict[str, set[str]]:
    found = modules()
    return {module: imports(path, set(found)) - {module} for module, path in found.items()}


def wrong_direction(edges: dict[str, set[str]]) -> list[str]:
    return sorted(f"{a} ({layer(a)}) imports {b} ({layer(b)})" for a, targets in edges.items()
                  for b in targets if layer(b) not in ALLOWED[layer(a)])


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_host_and_edge_never_import_each_other_and_the_contracts_import_neither():
    assert wrong_direction(graph()) == []


def test_there_is_no_import_cycle():
    assert cycles(graph()) == []


def test_the_checks_catch_what_they_are_for():
    """A host module reaching into edge, and two modules importing each other, are found."""
    edges = graph()
    edges["blockskip.host.serve"] = edges["blockskip.host.serve"] | {"blockskip.edge.agent"}
    edges["blockskip.edge.agent"] = edges["blockskip.edge.agent"] | {"blockskip.edge.messages"}
    edges["blockskip.edge.messages"] = edges["blockskip.edge.messages"] | {"blockskip.edge.agent"}
    assert "blockskip.host.serve (host) imports blockskip.edge.agent (edge)" in wrong_direction(edges)
    assert ["blockskip.edge.agent", "blockskip.edge.messages"] in cycles(edges)


# The host's per-subject steps have one pipeline (host/prepare.py); the modules that define a step
# or are a step's own command may call it, nothing else in the product does.
PIPELINE_STEPS = {"build_cache": {"blockskip.host.cache", "blockskip.host.prepare", "blockskip.host.prior"},
                  "build_prior": {"blockskip.host.prior", "blockskip.host.prepare"},
                  "build_base_pack": {"blockskip.host.basepack", "blockskip.host.seal", "blockskip.host.prepare"},
                  "build_subject_bundle": {"blockskip.host.basepack", "blockskip.host.seal", "blockskip.host.prepare"}}


def step_calls() -> list[str]:
    found = []
    for module, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                name = getattr(node.func, "id", None) or getattr(node.func, "attr", None)
                if name in PIPELINE_STEPS and module not in PIPELINE_STEPS[name]:
                    found.append(f"{module} calls {name}")
    return sorted(found)


def test_the_worker_and_the_demo_run_the_one_prepare_pipeline():
    assert step_calls() == []
    source = {m: p.read_text() for m, p in modules().items()}
    assert "prepare(" in source["blockskip.host.serve"] and "prepare(" in source["blockskip.demo"]
