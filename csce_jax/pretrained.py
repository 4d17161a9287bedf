"""The former path of :mod:`csce_jax.convert.pretrained` (the same module), kept for one
release."""

import sys

from csce_jax.convert import pretrained

sys.modules[__name__] = pretrained
