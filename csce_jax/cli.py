"""What every entry point shares: flag parsing with config errors in one line, the error
boundary (an input error is one ``error: ...`` line and exit 1, never a traceback), and a
quieter library log."""

from __future__ import annotations

import importlib.util
import logging as pylogging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import ml_collections
from absl import flags, logging

from csce_jax.errors import CsceError

T = TypeVar("T")


def load_config_file(spec: str) -> ml_collections.ConfigDict:
    """``path.py[:arg]`` -> the file's ``get_config(arg)``; any failure names the file."""
    path, _, arg = spec.partition(":")
    if not Path(path).is_file():
        raise CsceError(f"config file not found: {path}")
    module_spec = importlib.util.spec_from_file_location("_csce_config", path)
    if module_spec is None or module_spec.loader is None:
        raise CsceError(f"config file {path}: not a Python file")
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except SyntaxError as e:
        raise CsceError(f"config file {path}, line {e.lineno}: syntax error: {e.msg}") from None
    except Exception as e:
        raise CsceError(f"config file {path}: {type(e).__name__}: {e}") from None
    if not callable(getattr(module, "get_config", None)):
        raise CsceError(f"config file {path} has no get_config() function")
    try:
        return module.get_config(arg) if arg else module.get_config()
    except (ValueError, TypeError) as e:
        raise CsceError(f"config file {path}, argument {arg!r}: {e}") from None


def unknown_override(argv: list[str]) -> str | None:
    """A message for the first ``--config.a.b=v`` naming a key the config does not have."""
    spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    if spec is None and "--config" in argv[:-1]:
        spec = argv[argv.index("--config") + 1]
    if spec is None:
        return None
    config = load_config_file(spec)
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
    """absl flag parsing that turns a bad config file, argument or override into one line."""
    try:
        message = unknown_override(argv[1:])
    except CsceError as e:
        message = str(e)
    if message:
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def error_boundary(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Call ``fn``; an input or environment error exits 1 with one line naming its cause.

    Our own errors (config, data, checkpoint, conversion, workdir, non-finite loss, codes) and
    the operating system's (a full disk, a read-only or missing path) are reported; anything
    else is a bug and keeps its traceback. Ctrl-C outside the training loop exits 130.
    """
    try:
        return fn(*args, **kwargs)
    except CsceError as e:
        _fail(str(e))
    except OSError as e:
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        _fail(f"{where}{e.strerror or e}")
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    raise AssertionError("unreachable")


def _fail(message: str) -> None:
    logging.flush()
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(1) from None


def quiet_library_logs() -> None:
    """Keep Orbax's and grain's INFO chatter, and JAX's notes on the accelerator backends it
    did not find, out of the log (warnings still show)."""

    def keep(record: pylogging.LogRecord) -> bool:
        noisy = ("/orbax/", "/grain/", "/etils/")
        if record.levelno >= pylogging.WARNING:
            return True
        if "xla_bridge" in record.pathname and "Unable to initialize backend" in record.msg:
            return False  # JAX probing for a TPU or GPU this host does not have
        return not any(n in record.pathname for n in noisy)

    logging.get_absl_handler().addFilter(keep)


def apply_overrides(config: ml_collections.ConfigDict, overrides: list[str]) -> None:
    """Apply ``--config.a.b=value`` arguments (Python literals, else strings) to ``config``;
    an unknown key or a value of the wrong type is a CsceError naming it."""
    import ast

    for arg in overrides:
        if not arg.startswith("--config.") or "=" not in arg:
            raise CsceError(f"unrecognised argument {arg!r} (overrides read --config.key=value)")
        dotted, raw = arg[len("--config.") :].split("=", 1)
        *parents, leaf = dotted.split(".")
        node, walked = config, "config"
        for part in [*parents, leaf]:
            if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                valid = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
                raise CsceError(
                    f"unknown config key {walked}.{part} (from {arg!r}); valid keys of "
                    f"{walked}: {', '.join(valid)}"
                )
            if part != leaf:
                node, walked = node[part], f"{walked}.{part}"
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        try:
            node[leaf] = value
        except TypeError as e:
            raise CsceError(f"{arg}: {e}") from None
