"""The former path of :mod:`csce_jax.bridge.reference` (the same module), kept for one release."""

import sys

from csce_jax.bridge import reference

sys.modules[__name__] = reference
