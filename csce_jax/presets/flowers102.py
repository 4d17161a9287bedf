r"""Oxford Flowers-102: 102 classes, the official split (1,020 train, 1,020 val, 6,149 test).

Read from the official files in ``data.manual_dir`` (``102flowers.tgz`` or its ``jpg/``,
``imagelabels.mat``, ``setid.mat``, from the Visual Geometry Group's Flowers-102 page), or,
without it, from the tfds builder ``oxford_flowers102``. Database = train (``trnid``),
validation queries = ``valid`` (model selection), queries = ``tstid``; mAP over the whole
database.

CPU recipe (default; a narrow CSCE-Net from scratch at 112 px, no pretrained weights):

  csce-prepare --config configs/flowers102.py \
      --config.data.manual_dir=/data/flowers102 --out /data/flowers102_r128
  python train.py --config configs/flowers102.py --workdir runs/flowers \
      --config.data.manual_dir=/data/flowers102 --config.data.prepared=/data/flowers102_r128

(the first command is optional: without ``data.prepared`` the JPEGs are decoded every step).
Expected: query mAP@all 0.2375 at 48 bits (validation 0.2546), 5 min 34 s on a 2-core CPU VM
with the images at 256 px (docs/results.md).

GPU recipe (``:full``): the release's recipe, ResNet-50 at 224 px from ImageNet weights:

  python train.py --config configs/flowers102.py:full,bits=48 --workdir runs/flowers_full \
      --config.data.manual_dir=/data/flowers102

Arguments: bits=K, full, release (every release-compat switch), aspp, estimator=ste|release,
seed=N, steps=N (CPU recipe), epochs=N (full recipe).
"""

from __future__ import annotations

import ml_collections

from csce_jax.config import base_config, data_config, parse_arg, release_recipe, small_cpu_recipe


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    a = parse_arg(
        arg,
        bits=48,
        full=False,
        release=False,
        aspp=False,
        estimator="ste",
        seed=0,
        steps=2000,
        epochs=100,
    )
    if a.full:
        rest = [
            f"bits={a.bits}",
            f"seed={a.seed}",
            f"epochs={a.epochs}",
            f"estimator={a.estimator}",
        ]
        rest += ["release"] * a.release + ["aspp"] * a.aspp
        return release_recipe("oxford_flowers102", ",".join(rest), bits=a.bits, epochs=a.epochs)
    c = base_config()
    c.data = data_config("oxford_flowers102")
    c.data.resize = 128
    c.data.crop = 112
    c.data.num_workers = 2
    c.eval_batch_size = 200
    return small_cpu_recipe(
        c,
        a,
        width=1 / 8,
        steps=a.steps,
        eval_every=500,
        lr=2e-3,
        weight_decay=5e-4,
        warmup_steps=100,
    )
