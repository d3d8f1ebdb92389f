"""Imports point one way and never form a circle (static: every import statement of every module, lazy ones
inside functions too).

Layers, lowest first: wire < kernels < engine < kvconnector < node_runtime < roles < launch. A package may
import its own layer and lower ones; the two roles never import each other; the proxy imports only wire; tools
imports only wire (and torch). bench and tests may import anything. Between modules of the repository there is
no cycle, not even inside one package.
"""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent
LAYERS = [
    {"wire"},
    {"kernels"},
    {"engine", "tools"},
    {"kvconnector"},
    {"node_runtime"},
    {"prefill_node", "decode_node"},
    {"launch"},
]
LAYER = {package: rank for rank, packages in enumerate(LAYERS) for package in packages}
ONLY = {"proxy": {"proxy", "wire"}, "tools": {"tools", "wire"}}  # packages allowed less than their layer
NEVER = {("prefill_node", "decode_node"), ("decode_node", "prefill_node"), ("engine", "tools")}
OURS = set(LAYER) | {"proxy", "bench"}


def modules() -> dict[str, pathlib.Path]:
    found = {}
    for package in sorted(OURS):
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def imports(path: pathlib.Path, name: str, known: dict) -> set[str]:
    """The repository's modules that `name` imports (a package's __init__ counts for `from pkg import x` of a
    name that is not a module)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".")[: len(name.split(".")) - node.level + (1 if is_package else 0)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names
            ]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(path, name, known) for name, path in known.items()}


def test_packages_import_only_downwards():
    bad = []
    for name, targets in graph().items():
        src = name.split(".")[0]
        for target in sorted(targets):
            dst = target.split(".")[0]
            if src in ("bench",) or src == dst:
                continue
            if (src, dst) in NEVER:
                bad.append(f"{name} imports {target} (never)")
            elif src in ONLY and dst not in ONLY[src]:
                bad.append(f"{name} imports {target} ({src} imports only {sorted(ONLY[src])})")
            elif dst in ("proxy", "bench") or (src in LAYER and LAYER[dst] > LAYER[src]):
                bad.append(f"{name} imports {target}, a higher layer")
    assert not bad, "\n".join(bad)


def test_no_import_cycles():
    edges = graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(path[path.index(nxt) :] + [node, nxt]))
            elif nxt not in state:
                visit(nxt, path + [node])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [])
    assert not cycles, "\n".join(cycles)


def test_the_walk_sees_the_imports():
    """The checks above are only as good as the graph: spot-check that it holds known edges."""
    edges = graph()
    assert "wire.frames" in edges["proxy.node_rpc"]
    assert "engine.engine_core" in edges["node_runtime.node_server"]
    assert "node_runtime.node_cli" in edges["launch.cluster"]
