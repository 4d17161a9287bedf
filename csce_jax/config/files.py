"""Configs from files: a preset by name or any ``path.py[:arg]``, ``--config.a.b=value``
overrides, and a run's saved ``config.json``. Errors name the file, argument or key."""

from __future__ import annotations

import ast
import importlib.util
import json
from pathlib import Path

import ml_collections

from csce_jax.config.schema import from_json, unknown_key
from csce_jax.errors import ConfigError

PRESETS = Path(__file__).resolve().parent.parent / "presets"  # installed with the package


def presets() -> list[str]:
    """The preset names ``--config NAME`` accepts (``csce_jax/presets/NAME.py``)."""
    return sorted(p.stem for p in PRESETS.glob("*.py") if not p.stem.startswith("_"))


def resolve_spec(spec: str) -> str:
    """``path.py[:arg]`` unchanged where the file exists; ``NAME[:arg]`` (or a missing
    ``configs/NAME.py``) -> the installed preset's path."""
    path, colon, arg = spec.partition(":")
    if Path(path).is_file():
        return spec
    name = Path(path).stem if path.endswith(".py") else path
    if "/" not in path.removeprefix("configs/") and name in presets():
        return f"{PRESETS / f'{name}.py'}{colon}{arg}"
    return spec


def load_config_file(spec: str) -> ml_collections.ConfigDict:
    """``path.py[:arg]`` or ``NAME[:arg]`` -> the file's ``get_config(arg)``; any failure
    names the file."""
    path, _, arg = resolve_spec(spec).partition(":")
    if not Path(path).is_file():
        raise ConfigError(f"config file not found: {path} (presets: {', '.join(presets())})")
    module_spec = importlib.util.spec_from_file_location("_csce_config", path)
    if module_spec is None or module_spec.loader is None:
        raise ConfigError(f"config file {path}: not a Python file")
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except SyntaxError as e:
        raise ConfigError(f"config file {path}, line {e.lineno}: syntax error: {e.msg}") from None
    except Exception as e:
        raise ConfigError(f"config file {path}: {type(e).__name__}: {e}") from None
    if not callable(getattr(module, "get_config", None)):
        raise ConfigError(f"config file {path} has no get_config() function")
    try:
        return module.get_config(arg) if arg else module.get_config()
    except (ValueError, TypeError) as e:
        raise ConfigError(f"config file {path}, argument {arg!r}: {e}") from None


def override_key(arg: str) -> str:
    """The dotted key of ``--config.a.b=value``; an unknown key is a ConfigError naming it."""
    dotted = arg[len("--config.") :].split("=", 1)[0]
    message = unknown_key(dotted)
    if message is not None:
        raise ConfigError(f"{message} (from {arg!r})")
    return dotted


def apply_overrides(config: ml_collections.ConfigDict, overrides: list[str]) -> None:
    """Apply ``--config.a.b=value`` arguments (Python literals, else strings) to ``config``;
    an unknown key or a value of the wrong type is a ConfigError naming it."""
    for arg in overrides:
        if not arg.startswith("--config.") or "=" not in arg:
            raise ConfigError(f"unrecognised argument {arg!r} (overrides read --config.key=value)")
        *parents, leaf = override_key(arg).split(".")
        raw = arg.split("=", 1)[1]
        node = config
        for part in parents:
            node = node[part]
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        try:
            node[leaf] = value
        except TypeError as e:
            raise ConfigError(f"{arg}: {e}") from None


def read_config_json(path: str | Path) -> ml_collections.ConfigDict:
    """A config saved as JSON (a run's ``config.json``)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path} not found: pass --config, or point --workdir at a run")
    try:
        tree = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path} does not hold a config (a JSON object)")
    return from_json(tree, str(path))
