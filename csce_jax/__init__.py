"""csce_jax: CSCE-Net deep hashing (ACML 2022) in JAX / Flax NNX."""

__version__ = "0.1.0"
