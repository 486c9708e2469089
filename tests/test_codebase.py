"""The codebase's own shape, read from the source (no model, no import of the modules): imports that go one way,
functions that fit on a screen, and a README layout that names every module.

    .venv/bin/pytest tests/test_codebase.py -q
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "llava_lora"

# Modules data/ may import from above it: the plumbing every command shares, nothing that knows a model.
DATA_MAY_IMPORT = {"llava_lora.errors", "llava_lora.config", "llava_lora.outdirs"}


def _modules() -> dict[str, Path]:
    """{dotted name: file} of every module in llava_lora/ (a package by its own name)."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = path
    return out


def _imported(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that ``name`` imports anywhere in its file (inside functions too)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            # `from pkg import module` imports that module; `from module import thing`, the module
            submodules = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in modules]
            candidates = submodules if len(submodules) == len(node.names) else submodules + [base]
        elif isinstance(node, ast.Import):
            candidates = [a.name for a in node.names]
        else:
            continue
        found |= {c for c in candidates if c in modules and c != name}
    return found


def _import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imported(name, path, modules) for name, path in modules.items()}


def test_no_two_modules_import_each_other():
    graph = _import_graph()
    mutual = {(a, b) for a, deps in graph.items() for b in deps if a < b and a in graph[b]}
    assert not mutual


def test_the_import_graph_sees_lazy_and_relative_imports():
    graph = _import_graph()
    assert "llava_lora.modeling" in graph["llava_lora.config"]  # a lazy import, inside a function
    assert "llava_lora.errors" in graph["llava_lora.data.records"]  # from ..errors import ...
    assert "llava_lora.loss" in graph["llava_lora.heldout"]


def test_data_imports_nothing_that_knows_a_model():
    def in_data(name: str) -> bool:
        return name.split(".")[:2] == ["llava_lora", "data"]

    graph = _import_graph()
    for name, deps in graph.items():
        if in_data(name):
            above = {d for d in deps if not in_data(d)}
            assert above <= DATA_MAY_IMPORT, (name, above - DATA_MAY_IMPORT)


# Lines a function may take, its docstring included: one screen.
MAX_FUNCTION_LINES = 45


def test_every_function_reads_in_one_screen():
    long = {}
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long[f"{name}.{node.name}"] = lines
    assert not long


def _layout_modules(readme: str) -> list[str]:
    """The module files README.md's Layout section lists under llava_lora/ (``data/records.py`` for a nested one),
    read from each line's first column: names indented under a folder belong to it."""
    block = readme.split("## Layout\n", 1)[1].split("```\n")[1]
    lines = block.splitlines()
    start = lines.index("llava_lora/") + 1
    names, folders = [], {}
    for line in lines[start:]:
        if not line.startswith(" "):
            break  # the next top-level folder
        depth = (len(line) - len(line.lstrip())) // 2
        name = line.split()[0]
        folders = {d: f for d, f in folders.items() if d < depth}
        if name.endswith("/"):
            folders[depth] = name
        elif name.endswith(".py"):
            names.append("".join(folders[d] for d in sorted(folders)) + name)
    return names


def test_the_readme_layout_names_every_module_once():
    listed = _layout_modules((PACKAGE.parent / "README.md").read_text())
    on_disk = {p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*.py") if p.name != "__init__.py"}
    assert len(listed) == len(set(listed)), "a module listed twice"
    assert set(listed) == on_disk
