"""The node packages import one way: the runtime never imports a role, the two roles never import each other, and
engine/kernels import neither (static: every import statement of every module, lazy ones inside functions too)."""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent
FORBIDDEN = {
    "node_runtime": {"prefill_node", "decode_node", "proxy"},
    "prefill_node": {"decode_node", "proxy"},
    "decode_node": {"prefill_node", "proxy"},
    "engine": {"node_runtime", "prefill_node", "decode_node", "proxy"},
    "kernels": {"engine", "kvconnector", "node_runtime", "prefill_node", "decode_node", "proxy"},
    "kvconnector": {"node_runtime", "prefill_node", "decode_node", "proxy"},
}


def imported_packages(path: pathlib.Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_packages_import_only_downwards():
    bad = []
    for package, forbidden in FORBIDDEN.items():
        for path in sorted((ROOT / package).rglob("*.py")):
            hits = imported_packages(path) & forbidden
            if hits:
                bad.append(f"{path.relative_to(ROOT)} imports {sorted(hits)}")
    assert not bad, "\n".join(bad)
