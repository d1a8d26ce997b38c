"""Imports flow one way: core <- data_synth, train, eval <- experiments, and no module imports itself back through
others. Read from the source (every import, lazy ones inside functions included), so a shortcut fails here first."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# A package may import its own modules and those of lower layers only; one layer's packages never import each other.
LAYERS = {"core": 0, "data_synth": 1, "train": 1, "eval": 1, "experiments": 2}


def imports() -> dict[str, set[str]]:
    """module -> the project modules it imports (`from core import io` names core.io)."""
    graph: dict[str, set[str]] = {}
    for package in LAYERS:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found = graph.setdefault(module, set())
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
                else:
                    continue
                found.update(n for n in names if n.split(".")[0] in LAYERS)
    # keep only names that are modules (`from core.io import atomic_write` names the module core.io)
    return {m: {n for n in names if n in graph and n != m} for m, names in graph.items()}


def test_imports_flow_one_way():
    wrong = []
    for module, names in imports().items():
        top = module.split(".")[0]
        for name in names:
            other = name.split(".")[0]
            if other != top and LAYERS[other] >= LAYERS[top]:
                wrong.append(f"{module} imports {name}")
    assert not wrong, (
        "imports against the flow core <- data_synth, train, eval <- experiments:\n" + "\n".join(wrong)
    )


def test_no_import_cycles():
    graph = imports()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        path.append(module)
        for name in sorted(graph[module]):
            if state.get(name) == 1:
                return path[path.index(name) :] + [name]
            if name not in state and (cycle := visit(name)):
                return cycle
        path.pop()
        state[module] = 2
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module)):
            raise AssertionError("import cycle: " + " -> ".join(cycle))
