"""The former path of :mod:`csce_jax.bridge.gradients` (the same module), kept for one release."""

import sys

from csce_jax.bridge import gradients

sys.modules[__name__] = gradients
