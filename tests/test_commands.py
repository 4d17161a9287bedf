"""The commands: one place (``csce_jax.commands``), every ``--help`` answers with the command's
own flags and exit 0, and no library holds a command line."""

from __future__ import annotations

import ast
import importlib.util
import os
import subprocess
import sys
import tomllib

import numpy as np
import pytest
from conftest import ROOT

from csce_jax.runtime import hostmem

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
# The one python -m path besides the commands: the schema, as a table.
SCHEMA = {"csce_jax.config": "| field | default |"}


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


def test_every_command_answers_help_with_its_own_flags():
    modules = [m for m, _ in COMMANDS.values()] + list(SCHEMA)
    flags = {m: f for m, f in COMMANDS.values()} | SCHEMA
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
        if rel.startswith("commands/") or rel.endswith("__main__.py"):
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
    """No library imports a command or the command helpers, nor defines flags or runs an
    absl app."""
    for rel, path in _libraries():
        body = path.read_text()
        imported = _imported_modules(ast.parse(body))
        upward = {
            m for m in imported if m.startswith(("csce_jax.commands", "csce_jax.commands.cli"))
        }
        assert not upward, (rel, upward)
        assert "flags.DEFINE" not in body and "app.run(" not in body, rel


LIBTPU_NOISE = (
    "Failed to find host bounds",
    "TPU_WORKER_HOSTNAMES",
    "Unable to initialize backend",
)


def _run_command(module: str, *args: str, cwd) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu absent")
@pytest.mark.skipif(hostmem.accelerator_present(), reason="this host has an accelerator")
def test_commands_that_need_no_tpu_do_not_wake_libtpu(trained_run, tmp_path):
    """With libtpu installed on a CPU host, scoring codes and exporting a run print their
    result and nothing of libtpu's start-up."""
    rng = np.random.default_rng(0)
    for name, n in (("q", 5), ("d", 20)):
        np.save(tmp_path / f"{name}.npy", np.sign(rng.standard_normal((n, 16))))
        np.save(tmp_path / f"{name}l.npy", rng.integers(0, 3, n))
    scored = _run_command(
        "csce_jax.commands.eval",
        *("--query_codes=q.npy", "--db_codes=d.npy", "--query_labels=ql.npy"),
        "--db_labels=dl.npy",
        cwd=tmp_path,
    )
    exported = _run_command(
        "csce_jax.commands.convert",
        *("export", "--src", str(trained_run), "--dst", str(tmp_path / "m.safetensors")),
        cwd=tmp_path,
    )
    for done in (scored, exported):
        text = done.stdout + done.stderr
        assert done.returncode == 0, text[-2000:]
        assert not [n for n in LIBTPU_NOISE if n in text], text[-2000:]
    assert '"map@all"' in scored.stdout and (tmp_path / "m.safetensors").stat().st_size > 0


def test_every_command_keeps_jax_from_probing_an_absent_tpu():
    """Each command's entry calls cli.quiet_library_logs (which sets JAX_PLATFORMS=cpu where
    libtpu is installed on a host without an accelerator) before it starts JAX."""
    for name, (module, _) in COMMANDS.items():
        path = ROOT / (module.replace(".", "/") + ".py")
        assert "cli.quiet_library_logs()" in path.read_text(), name
