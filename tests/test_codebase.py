"""The codebase's own shape, read from the source (no model, no import of the modules): stages that import one
way, modules and functions that fit on a screen, and a layout (docs/layout.md, and the README's folder list) that
names every module and folder.

    .venv/bin/pytest tests/test_codebase.py -q
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "llava_lora"

# The plumbing every command shares (top-level modules): they import nothing from a stage folder.
PLUMBING = {"llava_lora", "llava_lora.__main__", "llava_lora.cli", "llava_lora.config", "llava_lora.errors",
            "llava_lora.outdirs", "llava_lora.tables"}
# Stage folder -> the stage folders its modules may import (beside the plumbing). The pipeline reads top to bottom:
# nothing imports train/ but the quickstart; data/ knows no model; the CLI names stages only as strings.
MAY_IMPORT = {
    "data": set(),
    "chat": {"data"},
    "kernels": set(),
    "model": {"data", "chat", "kernels"},
    "infer": {"data", "chat", "model"},
    "train": {"data", "chat", "kernels", "model", "infer"},
    "export": {"data", "chat", "kernels", "model", "infer"},
    "tiny": {"data", "chat", "model", "infer", "train", "export"},
}
# The one exception, imported inside the function that needs it: `data check --model` counts each record's tokens
# under the model's chat template (a tokenizer; never a model's weights).
ALLOWED = {("llava_lora.data.check", "llava_lora.chat.encode")}
# The plumbing data/ may import: nothing that knows a model.
DATA_MAY_IMPORT = {"llava_lora.errors", "llava_lora.config", "llava_lora.outdirs"}
MAX_MODULE_LINES = 450
MAX_TOP_LEVEL_MODULES = 10


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
    assert "llava_lora.model.loss" in graph["llava_lora.infer.evaluate"]  # a lazy import, inside a function
    assert "llava_lora.errors" in graph["llava_lora.data.records"]  # from ..errors import ...
    assert "llava_lora.model.loss" in graph["llava_lora.train.heldout"]
    assert "llava_lora.chat.encode" in graph["llava_lora.data.check"]


def _stage(name: str) -> str | None:
    """The stage folder of a module (``llava_lora.train.loop`` -> train), None for the plumbing."""
    parts = name.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in MAY_IMPORT else None


def test_every_module_is_plumbing_or_in_a_stage_folder():
    assert {n for n in _modules() if _stage(n) is None} == PLUMBING
    assert {_stage(n) for n in _modules()} - {None} == set(MAY_IMPORT)


def test_stages_import_one_way():
    """Each module imports the plumbing, its own stage, and the stages MAY_IMPORT names for it: nothing below train/
    imports it, data/ imports nothing that knows a model, the plumbing imports no stage."""
    wrong = set()
    for name, deps in _import_graph().items():
        mine = _stage(name)
        allowed = {mine} | MAY_IMPORT[mine] if mine else set()
        wrong |= {(name, d) for d in deps if _stage(d) is not None and _stage(d) not in allowed} - ALLOWED
    assert not wrong


def test_data_imports_nothing_that_knows_a_model():
    graph = _import_graph()
    for name, deps in graph.items():
        if _stage(name) == "data":
            above = {d for d in deps if _stage(d) != "data" and (name, d) not in ALLOWED}
            assert above <= DATA_MAY_IMPORT, (name, above - DATA_MAY_IMPORT)


def test_no_module_is_longer_than_a_few_screens():
    long = {name: n for name, path in _modules().items() if (n := len(path.read_text().splitlines())) > MAX_MODULE_LINES}
    assert not long


def test_the_top_level_holds_few_modules():
    top = [p.name for p in PACKAGE.glob("*.py")]
    assert len(top) <= MAX_TOP_LEVEL_MODULES, top


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
    """The module files docs/layout.md's Layout section lists under llava_lora/ (``data/records.py`` for a nested one),
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


def test_the_layout_names_every_module_once():
    listed = _layout_modules((PACKAGE.parent / "docs" / "layout.md").read_text())
    on_disk = {p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*.py") if p.name != "__init__.py"}
    assert len(listed) == len(set(listed)), "a module listed twice"
    assert set(listed) == on_disk


def test_the_readme_layout_names_every_folder():
    """The README's short layout: the top-level modules on one line, then each folder of llava_lora/ once."""
    block = (PACKAGE.parent / "README.md").read_text().split("## Layout\n", 1)[1].split("```\n")[1]
    lines = block.splitlines()
    inside = [line.split()[0] for line in lines[lines.index("llava_lora/") + 1:] if line.startswith("  ")]
    folders = {p.name + "/" for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert sorted(n for n in inside if n.endswith("/")) == sorted(folders)
    top = next(line for line in lines if line.strip().startswith("cli.py")).split("  ")[1].split()
    assert sorted(top) == sorted(p.name for p in PACKAGE.glob("*.py") if not p.name.startswith("__"))


MAX_README_LINES = 200


def test_the_readme_is_a_guide():
    """What it is, set-up, real use, where to read more: measured figures live in docs/ (performance.md,
    real-size.md), so re-measuring never churns the guide."""
    readme = (PACKAGE.parent / "README.md").read_text()
    assert len(readme.splitlines()) <= MAX_README_LINES
    linked = set(re.findall(r"\(docs/([\w-]+\.md)\)", readme))
    assert linked == {p.name for p in (PACKAGE.parent / "docs").glob("*.md")}
