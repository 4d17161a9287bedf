"""The former path of :mod:`csce_jax.bridge.sides` (the same module), kept for one release."""

import sys

from csce_jax.bridge import sides

sys.modules[__name__] = sides
