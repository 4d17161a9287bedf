"""The commands: one place (``csce_jax.commands``), every ``--help`` answers with the command's
own flags and exit 0, old ``python -m`` paths still run, and no library holds a command line."""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib

import pytest
from conftest import ROOT

PACKAGE = ROOT / "csce_jax"

# Each command's module, and a flag only its own --help lists.
COMMANDS = {
    "csce-train": ("csce_jax.commands.train", "start_over"),
    "csce-eval": ("csce_jax.commands.eval", "--query_codes"),
    "csce-search": ("csce_jax.commands.search", "{index,query,serve}"),
    "csce-convert": ("csce_jax.commands.convert", "--image_size"),
    "csce-compare": ("csce_jax.commands.compare", "--release_dir"),
    "csce-verify": ("csce_jax.commands.verify", "--out"),
    "csce-splits": ("csce_jax.commands.splits", "allow_size_mismatch"),
    "csce-prepare": ("csce_jax.commands.prepare", "--shard_size"),
    "csce-plan": ("csce_jax.commands.plan", "--target"),
}
# The former paths, kept for one release: the flag their command's --help lists.
FORMER = {
    "csce_jax.search": "{index,query,serve}",
    "csce_jax.convert": "--image_size",
    "csce_jax.data.prepare": "--shard_size",
    "csce_jax.data.verify": "--out",
    "csce_jax.data.splits": "allow_size_mismatch",
    "csce_jax.compare_torch": "--release_dir",
    "csce_jax.config": "| field | default |",  # the schema, as a table
}


def _helps(modules: list[str]) -> dict[str, subprocess.CompletedProcess]:
    """``python -m MODULE --help`` for each, run side by side."""
    procs = {
        m: subprocess.Popen(
            [sys.executable, "-m", m, "--help"],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for m in modules
    }
    done = {}
    for m, p in procs.items():
        out, err = p.communicate(timeout=300)
        done[m] = subprocess.CompletedProcess(p.args, p.returncode, out, err)
    return done


def test_console_scripts_all_point_into_commands():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert set(scripts) == set(COMMANDS)
    for name, target in scripts.items():
        module, _, function = target.partition(":")
        assert module == COMMANDS[name][0], name
        assert function in ("run", "main"), name


def test_every_command_and_former_path_answers_help_with_its_own_flags():
    modules = [m for m, _ in COMMANDS.values()] + list(FORMER)
    flags = {m: f for m, f in COMMANDS.values()} | FORMER
    for module, done in _helps(modules).items():
        text = done.stdout + done.stderr
        assert done.returncode == 0, (module, text[-2000:])
        assert flags[module] in text, (module, text[-2000:])
        assert "Traceback" not in text, (module, text[-2000:])
    train = _helps(["csce_jax.commands.train"])["csce_jax.commands.train"].stdout
    assert "--config.a.b=value" in train and "python -m csce_jax.config" in train


def _libraries():
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel.startswith("commands/") or rel == "cli.py" or rel.endswith("__main__.py"):
            continue
        yield rel, path


def _imported_modules(tree: ast.AST) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return names


def test_no_library_imports_a_command_or_defines_flags():
    """No library imports a command or the command helpers (a former path runs its command
    as a program, never importing it), nor defines flags or runs an absl app."""
    for rel, path in _libraries():
        body = path.read_text()
        imported = _imported_modules(ast.parse(body))
        upward = {m for m in imported if m.startswith(("csce_jax.commands", "csce_jax.cli"))}
        assert not upward, (rel, upward)
        assert "flags.DEFINE" not in body and "app.run(" not in body, rel


@pytest.mark.parametrize("rel", ["data/prepare.py", "data/verify.py", "data/splits.py"])
def test_a_former_path_is_only_a_two_line_block(rel):
    text = (PACKAGE / rel).read_text()
    block = text[text.index('if __name__ == "__main__":') :].strip().splitlines()
    assert [ln.strip() for ln in block if ln.strip()][1:] == [
        "import runpy",
        f'runpy.run_module("csce_jax.commands.{rel[5:-3]}", run_name="__main__", alter_sys=True)',
    ]


def test_the_readme_layout_names_every_module_and_package():
    readme = (ROOT / "README.md").read_text()
    layout = readme[readme.index("## Layout") :]
    layout = layout[: layout.index("```", layout.index("```") + 3)]
    for path in sorted(PACKAGE.iterdir()):
        if path.suffix == ".py" and path.stem != "__init__":
            assert f"{path.name}" in layout, path.name
        elif path.is_dir() and (path / "__init__.py").exists():
            assert f"{path.name}/" in layout, path.name


@pytest.mark.parametrize(
    ("former", "module"),
    [
        ("csce_jax.torch_reference", "csce_jax.bridge.reference"),
        ("csce_jax.torch_side", "csce_jax.bridge.sides"),
        ("csce_jax.compare_torch", "csce_jax.bridge.compare"),
        ("csce_jax.compare_gradients", "csce_jax.bridge.gradients"),
        ("csce_jax.pretrained", "csce_jax.convert.pretrained"),
    ],
)
def test_a_moved_module_is_the_same_module_under_its_former_name(former, module):
    """One module object under both names, so that a patch through either reaches both."""
    import importlib

    pytest.importorskip("torch")  # the PyTorch reference imports torch
    assert importlib.import_module(former) is importlib.import_module(module)


def test_the_official_file_readers_keep_their_former_names():
    from csce_jax.data import official, sources

    assert sources.flowers102_sources is official.flowers102_sources
    assert sources.AIRCRAFT_BANNER_ROWS == official.AIRCRAFT_BANNER_ROWS
    with pytest.raises(AttributeError):
        sources.no_such_reader  # noqa: B018
