r"""Food-101 (tfds food101; 75,750 train / 25,250 validation as query, 101 classes).

Command (a GPU, the data prepared as docs/data.md says):

  python train.py --config configs/food101.py:bits=48 --workdir runs/food101_48

Fine-grained protocol: database = training set, query = test set, mAP over the whole database.
Expected: not yet measured by us.
"""

from csce_jax.config import release_recipe


def get_config(arg=None):
    return release_recipe("food101", arg, bits=48, epochs=30)
