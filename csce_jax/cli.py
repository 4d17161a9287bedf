"""Command-line helpers shared by train.py and eval.py: config overrides checked by name."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import ml_collections
from absl import flags


def _load_config_file(spec: str) -> ml_collections.ConfigDict:
    path, _, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("_csce_config", path)
    if module_spec is None or not Path(path).is_file():
        raise SystemExit(f"error: config file not found: {path}")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module.get_config(arg) if arg else module.get_config()


def unknown_override(argv: list[str]) -> str | None:
    """A message for the first ``--config.a.b=v`` naming a key the config does not have."""
    spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    if spec is None and "--config" in argv[:-1]:
        spec = argv[argv.index("--config") + 1]
    if spec is None:
        return None
    config = _load_config_file(spec)
    for a in argv:
        if not a.startswith("--config."):
            continue
        dotted = a[len("--config.") :].split("=", 1)[0]
        node, walked = config, "config"
        for part in dotted.split("."):
            if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                valid = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
                return (
                    f"unknown config key {walked}.{part} (from {a!r}); valid keys of {walked}: "
                    f"{', '.join(valid)}"
                )
            node, walked = node[part], f"{walked}.{part}"
    return None


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing that turns a bad ``--config.*`` override into a one-line error."""
    message = unknown_override(argv[1:])
    if message:
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def run_reporting_errors(fn, *args, **kwargs):
    """Call ``fn``; an input error (config, data, checkpoint, conversion) exits with its message."""
    from csce_jax.builders import ConfigError
    from csce_jax.checkpointing import CheckpointError
    from csce_jax.convert import ConversionError
    from csce_jax.data.images import DataError

    try:
        return fn(*args, **kwargs)
    except (ConfigError, DataError, CheckpointError, ConversionError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
