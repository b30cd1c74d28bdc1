"""The package import graph of medkt is acyclic, function-level imports included.

Built from the source with ``ast`` (every ``import``/``from ... import`` anywhere in a module, not
only at its top), at the level of medkt's sub-packages and top-level modules: ``medkt.backends``
may not import ``medkt.segmentation`` if anything under ``medkt.segmentation`` imports
``medkt.backends`` - directly or through a chain. Plug-ins reach the engine through entry points
(``medkt.registry``), which are package metadata, not imports.
"""
from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "medkt"


def _module_names() -> dict[str, Path]:
    out = {}
    for f in PKG.rglob("*.py"):
        parts = list(f.relative_to(PKG.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


def _node(module: str) -> str:
    """``medkt.backends.open_clip_backend`` -> ``medkt.backends``; ``medkt.spine`` stays."""
    parts = module.split(".")
    if len(parts) >= 2 and (PKG / parts[1]).is_dir():
        return ".".join(parts[:2])
    return module


def imported_modules(path: Path, module: str, modules: dict[str, Path]) -> set[str]:
    """Every medkt module that ``path`` imports, at any depth of its code."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    for n in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(n, ast.Import):
            names = [a.name for a in n.names]
        elif isinstance(n, ast.ImportFrom):
            base = n.module or ""
            if n.level:
                parts = package.split(".")[: len(package.split(".")) - (n.level - 1)]
                base = ".".join(parts + ([base] if base else []))
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in n.names]
        else:
            continue
        found |= {m for m in map(resolve, (x for x in names if x.split(".")[0] == "medkt")) if m}
    return found


def package_graph() -> dict[str, set[str]]:
    modules = _module_names()
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        src = _node(module)
        graph.setdefault(src, set()).update(_node(m) for m in imported_modules(path, module, modules) if _node(m) != src)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a list of nodes (first == last), or None."""
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def visit(v: str) -> list[str] | None:
        state[v] = 1
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if state.get(w) == 1:
                return stack[stack.index(w):] + [w]
            if w not in state and (c := visit(w)):
                return c
        stack.pop()
        state[v] = 2
        return None

    for v in sorted(graph):
        if v not in state and (c := visit(v)):
            return c
    return None


def test_package_import_graph_is_acyclic():
    cycle = find_cycle(package_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_module_import_graph_is_acyclic():
    """Within a package too (e.g. the phantom world and its built-in findings)."""
    modules = _module_names()
    graph = {m: imported_modules(p, m, modules) - {m} for m, p in modules.items()}
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_graph_sees_function_level_imports(tmp_path):
    """The check itself: an import inside a function body is an edge (else the test could not fail)."""
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from medkt.segmentation.m2ib import M2IB\n    return M2IB\n")
    modules = _module_names()
    assert "medkt.segmentation.m2ib" in imported_modules(f, "medkt.backends.m", modules)
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
