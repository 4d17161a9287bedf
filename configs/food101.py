r"""Food-101 (tfds food101; 75,750 train / 25,250 validation as query, 101 classes).

Command (a GPU, the data prepared as the README says):

  python train.py --config configs/food101.py:bits=48 --workdir runs/food101_48

Fine-grained protocol: database = training set, query = test set, mAP over the whole database.
Expected: not yet measured by us. For orientation only (other people's method and runs),
SEMICON's published logs reach mAP 0.378 / 0.635 / 0.726 / 0.796 on CUB at 12 / 24 / 32 / 48 bits.
"""

from configs.common import release_recipe


def get_config(arg=None):
    return release_recipe("food101", arg, bits=48, epochs=30, train_size=75750)
