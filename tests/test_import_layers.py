"""Imports point one way and never form a circle (static: every import statement of every module, lazy ones
inside functions too).

The parts of the one package `pdserve`, lowest layer first: wire < kernels < engine < kvconnector <
node_runtime < roles < launch. A part may import its own layer and lower ones; the two roles never import each
other; the proxy imports only wire and the planner, the `pdserve bench` client (benchmarks) only wire; tools
imports only wire (and torch); the planner, torch-free, sits with wire and imports only it.
`pdserve/__init__.py` names the offline API lazily and `__main__` is the CLI's entry, so both sit above
launch. The repository's bench/ may import anything and nothing in pdserve imports it. Between modules of the
repository there is no cycle, not even inside one part.
"""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent
LAYERS = [
    {"wire", "planner"},
    {"kernels"},
    {"engine", "tools"},
    {"kvconnector"},
    {"node_runtime"},
    {"prefill_node", "decode_node"},
    {"launch"},
    {"__init__", "__main__"},
]
LAYER = {part: rank for rank, parts in enumerate(LAYERS) for part in parts}
# Parts allowed less than their layer.
ONLY = {
    "proxy": {"proxy", "wire", "planner"},
    "benchmarks": {"benchmarks", "wire"},
    "tools": {"tools", "wire"},
    "planner": {"planner", "wire"},
}
NEVER = {("prefill_node", "decode_node"), ("decode_node", "prefill_node"), ("engine", "tools")}
UNLAYERED = {"proxy", "benchmarks", "bench"}  # nothing of pdserve imports these


def modules() -> dict[str, pathlib.Path]:
    found = {}
    for path in sorted([*(ROOT / "pdserve").rglob("*.py"), *(ROOT / "bench").rglob("*.py")]):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def part(module: str) -> str:
    """The part a module is in: `pdserve.engine.llm` -> engine, `pdserve` -> __init__, `bench.x` -> bench."""
    names = module.split(".")
    if names[0] == "bench":
        return "bench"
    return names[1] if len(names) > 1 else "__init__"


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


def test_parts_import_only_downwards():
    bad = []
    for name, targets in graph().items():
        src = part(name)
        for target in sorted(targets):
            dst = part(target)
            if src == "bench" or src == dst:
                continue
            if (src, dst) in NEVER:
                bad.append(f"{name} imports {target} (never)")
            elif src in ONLY and dst not in ONLY[src]:
                bad.append(f"{name} imports {target} ({src} imports only {sorted(ONLY[src])})")
            elif dst in UNLAYERED or (src in LAYER and LAYER[dst] > LAYER[src]):
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
    assert "pdserve.wire.frames" in edges["pdserve.proxy.node_rpc"]
    assert "pdserve.engine.engine_core" in edges["pdserve.node_runtime.node_server"]
    assert "pdserve.node_runtime.node_cli" in edges["pdserve.launch.cluster"]
    assert "pdserve.benchmarks.results" in edges["bench.common"]
    assert "pdserve.launch.cli" in edges["pdserve.__main__"]


# The top-level names the repository installed before everything moved under pdserve/ (now: pdserve.<name>).
OLD_TOP_LEVEL = set(
    "wire kernels engine tools kvconnector node_runtime prefill_node decode_node proxy launch".split()
)


def test_no_file_imports_an_old_top_level_name():
    """`import engine` or `from kernels import ...` would find nothing, or another distribution (Hugging
    Face's `kernels`). The graph above drops imports it cannot place, so this looks at every statement."""
    bad = []
    for path in sorted(
        [*ROOT.glob("pdserve/**/*.py"), *ROOT.glob("bench/**/*.py"), *ROOT.glob("tests/**/*.py")]
    ):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            else:
                continue
            bad += [
                f"{path.relative_to(ROOT)}:{node.lineno} {n}"
                for n in names
                if n.split(".")[0] in OLD_TOP_LEVEL
            ]
    assert not bad, "\n".join(bad)


def test_every_part_is_layered():
    """A new folder under pdserve/ must be placed in LAYERS (or be unlayered on purpose), or the checks above
    would wave its imports through."""
    parts = {p.name for p in (ROOT / "pdserve").iterdir() if (p / "__init__.py").exists()}
    assert parts <= set(LAYER) | UNLAYERED, sorted(parts - set(LAYER) - UNLAYERED)
