r"""VegFru (manual_dir; official lists, 29,200 train / 116,931 test, 292 classes).

Command (a GPU, the data prepared as docs/data.md says):

  python train.py --config configs/vegfru.py:bits=48 --workdir runs/vegfru_48

Fine-grained protocol: database = training set, query = test set, mAP over the whole database.
Expected: not yet measured by us.
Add --config.data.manual_dir=/path/holding/vegfru.
"""

from csce_jax.config import release_recipe


def get_config(arg=None):
    return release_recipe("vegfru", arg, bits=48, epochs=50)
