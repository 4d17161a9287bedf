r"""The embedded demo: CSCE-Net (narrow) on scikit-learn's digits, CPU-friendly. No download.

Command (this machine, 2 CPU cores):

  python train.py --config configs/default.py --workdir runs/demo

Expected: query mAP@all >= 0.90 at 64 bits within 10 minutes wall time (see the README for the
measured figure). Variants: ``configs/default.py:bits=32``, ``configs/default.py:release``
(every release-compat switch on). Every field: ``csce_jax/config/schema.py``.
"""

from __future__ import annotations

import ml_collections

from csce_jax.config import base_config, data_config, parse_arg, small_cpu_recipe


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The digits demo: a narrow CSCE-Net, AdamW with a cosine schedule, 1,200 steps."""
    a = parse_arg(arg, bits=64, release=False, aspp=False, estimator="ste", seed=0)
    c = base_config()
    c.data = data_config("digits")
    c.data.resize = 128
    c.data.crop = 112
    c.data.flip = False  # mirrored digits are other glyphs
    c.data.num_workers = 2
    c.data.worker_processes = False  # digits decode from memory in microseconds: no spawn
    c.eval_batch_size = 256
    return small_cpu_recipe(
        c, a, width=1 / 16, steps=1200, eval_every=300, lr=2e-3, weight_decay=1e-4, warmup_steps=50
    )
