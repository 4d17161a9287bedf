r"""CUB-200-2011 (tfds caltech_birds2011; 5,994 train / 5,794 test, 200 classes).

Command (a GPU, the data prepared as docs/data.md says):

  python train.py --config configs/cub200.py:bits=48 --workdir runs/cub200_48

Fine-grained protocol: database = training set, query = test set, mAP over the whole database.
Expected: not yet measured by us. For orientation only (other people's method and runs),
SEMICON's published logs reach mAP 0.378 / 0.635 / 0.726 / 0.796 on CUB at 12 / 24 / 32 / 48 bits.
"""

from csce_jax.config import release_recipe


def get_config(arg=None):
    return release_recipe("cub200", arg, bits=48, epochs=100)
