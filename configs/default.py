r"""The embedded demo: CSCE-Net (narrow) on scikit-learn's digits, CPU-friendly. No download.

Command (this machine, 2 CPU cores):

  python train.py --config configs/default.py --workdir runs/demo

Expected: query mAP@all >= 0.90 at 64 bits within 10 minutes wall time (see the README for the
measured figure). Variants: ``configs/default.py:bits=32``, ``configs/default.py:release``
(every release-compat switch on). Shared fields and helpers live in ``configs/common.py``.
"""

from __future__ import annotations

import ml_collections

from configs.common import apply_release, base_config, data_config, parse_arg


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The digits demo: a narrow CSCE-Net, AdamW with a cosine schedule, 1,200 steps."""
    a = parse_arg(arg, bits=64, release=False, aspp=False, estimator="ste", seed=0)
    c = base_config()
    c.seed = a.seed
    c.bits = a.bits
    c.data = data_config("digits")
    c.data.resize = 128
    c.data.crop = 112
    c.data.flip = False  # mirrored digits are other glyphs
    c.data.num_workers = 2
    c.data.worker_processes = False  # digits decode from memory in microseconds: no spawn
    c.batch_size = 64
    c.eval_batch_size = 256
    c.total_steps = 1200
    c.log_every_steps = 50
    c.eval_every_steps = 300
    c.checkpoint_every_steps = 300
    c.model.width = 1 / 16
    c.model.depths = (1, 1, 1, 1)
    c.model.use_aspp = a.aspp
    c.optimizer.name = "adamw"
    c.optimizer.lr = 2e-3
    c.optimizer.weight_decay = 1e-4
    c.optimizer.schedule = "cosine"
    c.optimizer.warmup_steps = 50
    c.dsf.estimator = a.estimator
    if a.release:
        apply_release(c)
    return c
