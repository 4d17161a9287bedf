"""The config schema: one table that the defaults, the checks, the resume policy, the unknown-key
errors, the presets, the docs and the command line all come from."""

import json
import subprocess
import sys
import tomllib
from importlib import import_module
from pathlib import Path

import pytest
from conftest import ROOT

from csce_jax.config import (
    FIELDS,
    base_config,
    check_config,
    load_config_file,
    presets,
    release_training,
    resolve_spec,
    resumable,
)
from csce_jax.config.__main__ import fields_table
from csce_jax.config.files import override_key
from csce_jax.config.schema import BY_KEY, flatten, from_json
from csce_jax.errors import ConfigError


def test_every_default_is_allowed_and_the_defaults_pass_the_checks():
    for f in FIELDS:
        if f.choices is not None:
            assert f.default in f.choices, f.key
        if f.check is not None:
            assert f.check(f.default) is None, f.key
    check_config(base_config(), 1, 1)
    assert set(flatten(base_config())) == set(BY_KEY)


@pytest.mark.parametrize("name", presets())
def test_every_preset_loads_by_name_and_by_path_and_passes_the_checks(name):
    by_name = load_config_file(name)
    by_path = load_config_file(f"configs/{name}.py")
    assert by_name.to_dict() == by_path.to_dict()
    check_config(by_name, 1, 1)


def test_presets_are_the_installed_files_and_a_path_wins_over_a_name(tmp_path):
    files = sorted(p.stem for p in (ROOT / "csce_jax" / "presets").glob("[!_]*.py"))
    assert presets() == files and "default" in files
    assert resolve_spec("cub200:bits=32").endswith("csce_jax/presets/cub200.py:bits=32")
    own = tmp_path / "default.py"
    own.write_text("from csce_jax.config import base_config\nget_config = base_config\n")
    assert resolve_spec(str(own)) == str(own)
    with pytest.raises(ConfigError, match="config file not found: nope.*presets: aircraft"):
        load_config_file("nope")


def test_unknown_keys_are_named_with_the_valid_ones():
    with pytest.raises(ConfigError, match=r"config.model.widht.*valid keys of config.model: "):
        override_key("--config.model.widht=2")
    with pytest.raises(ConfigError, match=r"config.modle.width.*valid groups and keys: .*model"):
        override_key("--config.modle.width=2")
    with pytest.raises(ConfigError, match="is a group, not a field"):
        override_key("--config.model=2")
    c = base_config()
    c.unlock()
    c.model.extra = 1
    with pytest.raises(ConfigError, match="unknown config key config.model.extra"):
        check_config(c, 1, 1)


def test_the_resume_policy_is_the_tables():
    assert (
        resumable("total_steps") and resumable("data.num_workers") and resumable("testing.signal")
    )
    assert not resumable("bits") and not resumable("optimizer.lr") and not resumable("seed")
    assert resumable("data.num_threads")  # a retired key computes nothing now
    assert {f.key for f in FIELDS if f.resumable} == {k for k in BY_KEY if resumable(k)}


def test_a_saved_config_reads_back_equal_and_drops_retired_keys():
    c = load_config_file("default:bits=32")
    saved = json.loads(c.to_json_best_effort())
    saved["data"]["num_threads"] = 4  # written by an older version
    back = from_json(saved, "config.json")
    assert back.to_dict() == c.to_dict() and isinstance(back.model.depths, tuple)


def test_the_release_training_recipe_switches_everything_on():
    c = release_training(load_config_file("default"))
    assert (c.optimizer.name, c.optimizer.lr, c.optimizer.weight_decay) == ("rmsprop", 1e-5, 1e-5)
    assert c.optimizer.schedule == "constant" and c.optimizer.warmup_steps == 0
    assert c.dsf.estimator == "release" and all(c.release_compat.values())
    check_config(c, 1, 1)


def test_the_docs_hold_the_schemas_table():
    assert fields_table() in (ROOT / "docs" / "training.md").read_text()


def test_every_console_command_names_a_function():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    names = {"train", "eval", "search", "convert", "compare", "verify", "splits", "prepare", "plan"}
    assert set(scripts) == {f"csce-{n}" for n in names}
    for target in scripts.values():
        module, _, function = target.partition(":")
        assert callable(getattr(import_module(module), function)), target


def test_the_config_file_is_read_once_and_its_errors_are_one_line(tmp_path):
    marker = tmp_path / "reads"
    spec = tmp_path / "counted.py"
    spec.write_text(
        "from csce_jax.config import base_config\n"
        f"open({str(marker)!r}, 'a').write('read\\n')\n"
        "def get_config():\n    c = base_config()\n    c.bits = 1\n    return c\n"
    )
    args = ["--config", str(spec), "--workdir", str(tmp_path / "w"), "--config.seed=3"]
    out = subprocess.run(
        [sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 1 and out.stderr.strip().splitlines()[-1] == (
        "error: config.bits=1: a code needs at least 2 bits"
    ), out.stderr[-2000:]
    assert marker.read_text() == "read\n"
    assert not Path(tmp_path / "w" / "checkpoints").exists()


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("dsf.temperature", float("nan"), r"must be a finite number in \(0, 100\]"),
        ("dsf.temperature", 0.0, r"must be a finite number in \(0, 100\]"),
        ("loss.scale", 0.0, r"must be a finite number in \(0, 1000\]"),
        ("loss.scale", float("inf"), "must be a finite number"),
        ("loss.margin", -0.1, r"in \[0, 1.5708\)"),
        ("loss.margin", float("nan"), "must be a finite number"),
        ("model.signt", 1.5, r"in \[0, 1\)"),
        ("model.signt", -0.01, r"in \[0, 1\)"),
        ("data.topk", -2, "must be 0 \\(the protocol's\\), -1"),
    ],
)
def test_out_of_range_loss_and_dsf_values_are_refused_naming_the_key(key, value, message):
    """A NaN or zero temperature, a scale or margin out of range, a threshold clip outside
    [0, 1), a cut-off below -1: refused before anything runs (not a NaN loss later)."""
    config = base_config()
    section, name = key.split(".")
    config[section][name] = value
    with pytest.raises(ConfigError, match=rf"config\.{key}=.*{message}"):
        check_config(config, 1, 1)


def test_a_width_too_narrow_for_the_windows_is_refused_before_anything_runs():
    config = base_config()
    config.model.width = 0.005  # 4 stage-3 channels: 4x4 windows need a multiple of 16
    with pytest.raises(ConfigError, match=r"config\.model\.width=0\.005: gives 4 stage-3"):
        check_config(config, 1, 1)
    config.model.width = 1 / 16
    check_config(config, 1, 1)
