"""The package's shape: no import cycle anywhere in ``ablate/``, at module or function level.

The imports are read with ``ast`` (nothing is imported), so an import inside a function counts
as much as one at the top: a cycle that only closes at run time is still a cycle a reader has
to untangle. Two kinds of block are left out, because they never run as an import of the
module by the package: ``if __name__ == "__main__":`` (the module run as a script is a separate
module object) and ``if TYPE_CHECKING:``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import ablate

PACKAGE = Path(ablate.__file__).parent


def _skipped(node: ast.AST) -> bool:
    if not isinstance(node, ast.If):
        return False
    test = ast.unparse(node.test)
    return test in ("__name__ == '__main__'", '__name__ == "__main__"', "TYPE_CHECKING", "typing.TYPE_CHECKING")


def _imports(tree: ast.AST, modules: set[str]) -> set[str]:
    """First-party modules ``tree`` imports, outside skipped blocks."""
    out: set[str] = set()
    stack = [tree]
    while stack:
        node = stack.pop()
        if _skipped(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and \
                node.module.split(".")[0] == "ablate":
            parts = node.module.split(".")
            out |= {parts[1]} if len(parts) > 1 else {a.name for a in node.names if a.name in modules}
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            out |= {node.module.split(".")[0]} if node.module else {a.name for a in node.names}
        elif isinstance(node, ast.Import):
            out |= {a.name.split(".")[1] for a in node.names if a.name.startswith("ablate.")}
        stack.extend(ast.iter_child_nodes(node))
    return out & modules


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    files = {p.stem: p for p in package.glob("*.py") if p.stem != "__init__"}
    modules = set(files)
    return {name: _imports(ast.parse(path.read_text()), modules) - {name} for name, path in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` as a path ``[a, b, ..., a]``, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_the_checker_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    code = "def f():\n    from ablate import b\nif __name__ == '__main__':\n    from ablate.c import main\n"
    assert _imports(ast.parse(code), {"b", "c"}) == {"b"}  # function level counts, the script guard does not


def test_no_import_cycle_in_the_package():
    graph = import_graph()
    assert {"base", "preflight", "check", "results", "trial"} <= set(graph)
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)
