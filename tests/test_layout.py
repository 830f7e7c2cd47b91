"""The package's shape, read from its source: no import cycle among cpuft's modules, nor among
its packages (a module of one package importing another package that imports it back, lazily or
not, is a cycle too). Imports are read with `ast`, inside functions included."""

from __future__ import annotations

import ast
from pathlib import Path

import cpuft

PACKAGE_ROOT = Path(cpuft.__file__).parent


def module_imports() -> dict[str, set[str]]:
    """cpuft module -> the cpuft modules it imports anywhere in its source."""
    modules = {}
    for path in PACKAGE_ROOT.rglob("*.py"):
        parts = path.relative_to(PACKAGE_ROOT.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    imports = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("cpuft"):
                targets = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                continue
            imports[name] |= {target for target in targets if target in modules and target != name}
    return imports


def package_of(module: str) -> str:
    """cpuft.train.sft -> cpuft.train; a top-level module (cpuft.run_dir) is its own package."""
    return ".".join(module.split(".")[:2])


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan's algorithm)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
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

    for node in list(graph):
        if node not in index:
            visit(node)
    return found


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_among_modules():
    assert cycles(module_imports()) == []


def test_no_import_cycle_among_packages():
    packages: dict[str, set[str]] = {}
    for module, targets in module_imports().items():
        packages.setdefault(package_of(module), set()).update(
            package_of(t) for t in targets if package_of(t) != package_of(module)
        )
    assert cycles(packages) == []


def test_the_sft_recipe_reads_on_a_screen_or_two():
    # The job top to bottom in one module (issue 20): at most 200 lines.
    assert len((PACKAGE_ROOT / "train" / "sft.py").read_text().splitlines()) <= 200
