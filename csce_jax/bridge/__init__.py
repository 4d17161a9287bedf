"""The PyTorch bridge: what proves the port against the release.

- :mod:`csce_jax.bridge.reference`: our PyTorch reference of the release network, DSF and loss
  (needs torch, not torchvision).
- :mod:`csce_jax.bridge.sides`: the PyTorch side of a comparison (the reference or the
  release's own ``ResNet_DOLG``) and the setup both comparisons share.
- :mod:`csce_jax.bridge.compare`: both sides trained on the same batches, against the floor
  that rounding alone gives (``csce-compare``).
- :mod:`csce_jax.bridge.gradients`: one batch, tensor by tensor against float64
  (``csce-compare --gradients``).

Weights move between the two with :mod:`csce_jax.convert`.
"""
