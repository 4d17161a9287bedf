"""What every entry point shares: flag parsing with config errors in one line, the error
boundary (an input error is one ``error: ...`` line and exit 1, never a traceback), and a
quieter library log."""

from __future__ import annotations

import logging as pylogging
import os
import sys
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from absl import flags, logging
from ml_collections import config_flags

from csce_jax.config.files import load_config_file, override_key
from csce_jax.errors import ConfigError, CsceError

T = TypeVar("T")


HELP_FLAGS = {"--help", "--helpshort", "--helpfull", "-h", "-?"}
CONFIG_HELP = (
    "a preset (cub200, default, ...) or a config file, with :args (e.g. cub200:bits=32); "
    "then any field with --config.a.b=value (every field, its default and allowed values: "
    "python -m csce_jax.config)"
)


def config_spec(argv: list[str]) -> tuple[str | None, list[str]]:
    """(the ``--config`` value, argv without it)."""
    for i, a in enumerate(argv):
        if a.startswith("--config="):
            return a.split("=", 1)[1], argv[:i] + argv[i + 1 :]
        if a == "--config" and i + 1 < len(argv):
            return argv[i + 1], argv[:i] + argv[i + 2 :]
    return None, argv


def flags_parser(
    *, config_required: bool, module: str | None = None, with_config: bool = True
) -> Callable[[list[str]], list[str]]:
    """absl's flag parsing, with ``--config NAME|path.py[:args]`` read once through
    :func:`csce_jax.config.load_config_file` and every ``--config.a.b=v`` key checked against
    the schema: a bad file, argument, key or value is one ``error:`` line (exit 2). The flags
    of ``module`` (the command's) are listed by ``--help`` whatever script started it, and
    ``--help`` exits 0. ``with_config=False``: a command without a config (no ``--config`` flag)."""

    def parse(argv: list[str]) -> list[str]:
        if not with_config:
            return _parse_plain(argv, module)
        spec, rest = config_spec(argv)
        try:
            for a in rest:
                if a.startswith("--config."):
                    if spec is None:
                        raise ConfigError(f"{a.split('=')[0]} needs --config")
                    override_key(a)
            config = load_config_file(spec) if spec is not None else None
        except ConfigError as e:
            _usage_error(str(e))
        if config is None:
            flags.DEFINE_string("config", None, CONFIG_HELP)
        else:
            config_flags.DEFINE_config_dict(
                "config", config, CONFIG_HELP, lock_config=True, sys_argv=rest
            )
        _show_in_help(__name__, module)
        asked_help = bool(HELP_FLAGS & set(rest))
        if spec is None and config_required and not asked_help:
            _usage_error(
                "--config is required (a preset such as cub200 or default, or a config file)"
            )
        try:
            return flags.FLAGS(rest)
        except flags.Error as e:
            _usage_error(str(e))
        except SystemExit as e:  # absl ends its --help with status 1: help asked is success
            raise SystemExit(0 if asked_help and e.code == 1 else e.code) from None
        raise AssertionError("unreachable")

    return parse


def _parse_plain(argv: list[str], module: str | None) -> list[str]:
    _show_in_help(module)
    asked_help = bool(HELP_FLAGS & set(argv))
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        _usage_error(str(e))
    except SystemExit as e:
        raise SystemExit(0 if asked_help and e.code == 1 else e.code) from None
    raise AssertionError("unreachable")


def _show_in_help(*modules: str | None) -> None:
    main = sys.argv[0]
    # A console script's generated __main__ has no docstring: --help shows the command's.
    top = sys.modules.get("__main__")
    command = sys.modules.get(modules[-1]) if modules and modules[-1] else None
    if top is not None and not top.__doc__ and command is not None:
        top.__doc__ = command.__doc__
    shown = {f.name for f in flags.FLAGS.get_flags_for_module(main)}
    for module in filter(None, modules):
        for flag in flags.FLAGS.get_flags_for_module(module):
            if flag.name not in shown:
                flags.FLAGS.register_flag_by_module(main, flag)


def _usage_error(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


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


def interruptible(fn: Callable[..., T], *args: Any) -> T:
    """Call ``fn`` in a worker thread, so that Ctrl-C stops the command within a moment even
    while XLA compiles (a compile cannot be interrupted, and holds the main thread for minutes
    otherwise): the work in progress is abandoned, nothing more is written, exit 130."""
    done: dict[str, Any] = {}

    def work() -> None:
        try:
            done["value"] = fn(*args)
        except BaseException as e:  # handed to the main thread as it is
            done["error"] = e

    worker = threading.Thread(target=work, name=getattr(fn, "__name__", "work"), daemon=True)
    worker.start()
    try:
        while worker.is_alive():
            worker.join(0.2)
    except KeyboardInterrupt:
        logging.flush()
        print(
            "error: interrupted (the work in progress abandoned, nothing written)", file=sys.stderr
        )
        sys.stderr.flush()
        os._exit(130)  # the worker may be inside a compile that only ending the process stops
    if "error" in done:
        raise done["error"]
    return done["value"]


def _fail(message: str) -> None:
    logging.flush()
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(1) from None


def quiet_library_logs() -> None:
    """Keep Orbax's and grain's INFO chatter, and JAX's notes on the accelerator backends it
    did not find, out of the log (warnings still show); where libtpu is installed on a host
    without a TPU, keep JAX from probing it (:func:`csce_jax.runtime.hostmem.skip_absent_tpu`)."""
    from csce_jax.runtime import hostmem

    hostmem.skip_absent_tpu()

    def keep(record: pylogging.LogRecord) -> bool:
        noisy = ("/orbax/", "/grain/", "/etils/")
        if record.levelno >= pylogging.WARNING:
            return True
        if "xla_bridge" in record.pathname and "Unable to initialize backend" in record.msg:
            return False  # JAX probing for a TPU or GPU this host does not have
        return not any(n in record.pathname for n in noisy)

    logging.get_absl_handler().addFilter(keep)
    _drop_closed_loop_tracebacks()


def _is_closed_loop(exc: BaseException | None) -> bool:
    return isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"


def _drop_closed_loop_tracebacks() -> None:
    """When a checkpoint does not restore (or a save fails), Orbax stops its asyncio loop
    while tensorstore still has reads or writes in flight; each one that completes later
    reports "Event loop is closed" with a traceback, dozens of them after the one-line error
    that matters. Those (and only those) are dropped."""
    if getattr(sys.excepthook, "_drops_closed_loop", False):
        return
    previous_hook, previous_unraisable = sys.excepthook, sys.unraisablehook

    def excepthook(kind, exc, tb):
        if not _is_closed_loop(exc):
            previous_hook(kind, exc, tb)

    def unraisablehook(info):
        if not _is_closed_loop(info.exc_value):
            previous_unraisable(info)

    excepthook._drops_closed_loop = True  # type: ignore[attr-defined]
    sys.excepthook, sys.unraisablehook = excepthook, unraisablehook
