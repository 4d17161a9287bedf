"""csce_jax: CSCE-Net deep hashing (ACML 2022) in JAX / Flax NNX.

``csce_jax.load_model(path_or_workdir)`` and ``csce_jax.encode(model, images)`` are the public
Python API (``csce_jax.api``). They are imported on first use, so that ``train.py`` can tune
the host allocator (``csce_jax.runtime.hostmem``) before JAX starts any thread.
"""

from typing import Any

__version__ = "0.1.0"
__all__ = ["encode", "load_model"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from csce_jax import api

        return getattr(api, name)
    raise AttributeError(f"module 'csce_jax' has no attribute {name!r}")
