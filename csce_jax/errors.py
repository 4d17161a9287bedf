"""The project's error types: each names the file, key or value at fault and what would fix it.

Entry points turn any of these into one ``error: ...`` line and a non-zero exit
(:func:`csce_jax.commands.cli.error_boundary`); a traceback means a bug, not bad input.
"""

from __future__ import annotations


class CsceError(Exception):
    """Base class: bad input or a failed operation that the message fully explains."""


class ConfigError(CsceError, ValueError):
    """A config value or config file is invalid; the message names the key or file."""


class DataError(CsceError, ValueError):
    """An input (file, list line, split) cannot be used; the message names it."""


class CheckpointError(CsceError, RuntimeError):
    """A checkpoint cannot be restored or saved; the message names the path."""


class ConversionError(CsceError, ValueError):
    """A state dict does not fit the model (the message lists every offending key), or an
    exported encoder cannot be written or used."""


class WorkdirError(CsceError, RuntimeError):
    """The run folder cannot be used (locked by another process, a refused config change)."""


class NonFiniteLossError(CsceError, FloatingPointError):
    """The loss or the parameters became NaN or infinite; nothing non-finite was saved."""


class CodesError(CsceError, ValueError):
    """Codes, labels or an index file are malformed or do not fit together."""
