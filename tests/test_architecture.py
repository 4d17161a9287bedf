"""The package's plan: a short root, folders ordered by layer, no aliases, no import circles,
short functions. These read the source (no import), so they hold for every module, also those
the other tests never load."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from conftest import ROOT

PACKAGE = ROOT / "csce_jax"
# Top to bottom: a folder imports only folders below it (and errors.py, which every layer may).
LAYERS = (
    "commands",
    "planning",
    "bridge",
    "search",
    "train",
    "runs",
    "retrieval",
    "convert",
    "hashing",
    "models",
    "data",
    "presets",
    "config",
    "runtime",
    "utils",
)
ROOT_FILES = {"__init__.py", "api.py", "errors.py"}
MAX_FUNCTION_LINES = 60


def _modules() -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its ``__init__``)."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _resolve(name: str) -> str | None:
    """The module of the package that an imported name lives in (None: not ours)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str) -> set[str]:
    """The package's modules that ``module`` imports, at any depth of its code. Importing
    ``a.b.c`` runs ``a/__init__`` and ``a/b/__init__`` too, so those count as well."""
    tree = ast.parse(MODULES[module].read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names |= {f"{node.module}.{a.name}" for a in node.names} | {node.module}
    found = {m for m in map(_resolve, names) if m and m != module}
    parents = {".".join(m.split(".")[:i]) for m in found for i in range(2, m.count(".") + 1)}
    # A package's own __init__ is running already when its modules are imported.
    own = {".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 1)}
    return (found | parents) - own - {module, "csce_jax"}


def _folder(module: str) -> str:
    """The job folder ``module`` lies in, or "(root)" for the package's own files."""
    parts = module.split(".")
    in_folder = len(parts) > 2 or (len(parts) == 2 and MODULES[module].name == "__init__.py")
    return parts[1] if in_folder else "(root)"


def test_the_root_holds_the_public_face_and_job_folders_only():
    files = {p.name for p in PACKAGE.iterdir() if p.is_file() and p.suffix == ".py"}
    assert files == ROOT_FILES
    folders = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    assert folders == set(LAYERS)


def test_a_folder_imports_only_folders_below_it():
    rank = {name: i for i, name in enumerate(LAYERS)}
    upward = []
    for module in MODULES:
        here = _folder(module)
        for target in _imports(module):
            there = _folder(target)
            if there == "(root)":
                allowed = target == "csce_jax.errors" or here in ("commands", "(root)")
            else:
                allowed = here == "(root)" or there == here or rank[there] > rank[here]
            if not allowed:
                upward.append(f"{module} -> {target}")
    assert not upward, upward


def test_no_import_circle():
    graph = {m: _imports(m) for m in MODULES}
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            raise AssertionError(" -> ".join([*path[path.index(module) :], module]))
        if module in done:
            return
        for target in sorted(graph[module]):
            visit(target, [*path, module])
        done.add(module)

    for module in sorted(graph):
        visit(module, [])


def test_the_layer_check_catches_an_upward_import(tmp_path, monkeypatch):
    """The layer test above is live: a runs/ module importing train/ is reported."""
    fake = tmp_path / "upward.py"
    fake.write_text("from csce_jax.train import loop\n")
    monkeypatch.setitem(MODULES, "csce_jax.runs.upward", fake)
    with pytest.raises(AssertionError, match=r"csce_jax\.runs\.upward -> csce_jax\.train"):
        test_a_folder_imports_only_folders_below_it()


def test_no_alias_module_and_no_main_path_but_the_commands():
    """A module that only stands for another (``sys.modules[...] = ...``, a re-export
    under an old name) is gone; ``python -m`` runs a command module or the schema table."""
    mains = []
    for module, path in MODULES.items():
        text = path.read_text()
        assert "sys.modules[__name__]" not in text, module
        if path.name == "__main__.py" or 'if __name__ == "__main__"' in text:
            mains.append(module)
    assert all(m.startswith("csce_jax.commands.") or m == "csce_jax.config.__main__" for m in mains)


def test_no_history_in_the_code_or_the_docs():
    """Names are current: no "former name", "kept for one release" or "moved to"."""
    wording = re.compile(r"former (name|home|path|form)|for one release|its old name|moved to csce")
    texts = [*MODULES.values(), ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    found = [
        f"{p.relative_to(ROOT)}: {m.group(0)}"
        for p in texts
        if (m := wording.search(p.read_text()))
    ]
    assert not found, found


def test_every_function_is_at_most_60_lines():
    long = []
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{module}.{node.name}: {lines} lines")
    assert not long, long


def test_private_jax_is_read_in_one_place_only():
    """JAX's internals are read by one function (whether the backends have started, which JAX
    has no public query for), nowhere else."""
    private = {m for m, p in MODULES.items() if re.search(r"\bjax\._src\b", p.read_text())}
    assert private == {"csce_jax.runtime.startup"}
    text = MODULES["csce_jax.runtime.startup"].read_text()
    assert text.count("from jax._src import") == 1


def test_the_architecture_page_names_every_folder_and_module():
    page = (ROOT / "docs" / "architecture.md").read_text()
    for module, path in MODULES.items():
        if module.startswith("csce_jax.presets.") or path.name == "__init__.py":
            continue
        rel = path.relative_to(PACKAGE).as_posix()
        name = rel if "/" not in rel else rel.split("/", 1)[1]
        assert name in page, rel
    for folder in LAYERS:
        assert f"{folder}/" in page, folder


def test_the_readme_fits_its_budget():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 220
