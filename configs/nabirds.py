r"""NABirds (manual_dir; 23,929 train / 24,633 test, 555 classes).

Command (a GPU, the data prepared as the README says):

  python train.py --config configs/nabirds.py:bits=48 --workdir runs/nabirds_48

Fine-grained protocol: database = training set, query = test set, mAP over the whole database.
Expected: not yet measured by us. For orientation only (other people's method and runs),
SEMICON's published logs reach mAP 0.378 / 0.635 / 0.726 / 0.796 on CUB at 12 / 24 / 32 / 48 bits.
Add --config.data.manual_dir=/path/holding/nabirds.
"""

from configs.common import release_recipe


def get_config(arg=None):
    return release_recipe("nabirds", arg, bits=48, epochs=50, train_size=23929)
