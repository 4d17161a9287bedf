r"""NABirds (manual_dir; 23,929 train / 24,633 test, 555 classes).

Command (a GPU, the data prepared as docs/data.md says):

  python train.py --config configs/nabirds.py:bits=48 --workdir runs/nabirds_48

Fine-grained protocol: database = training set, query = test set, mAP over the whole database.
Expected: not yet measured by us.
Add --config.data.manual_dir=/path/holding/nabirds.
"""

from csce_jax.config import release_recipe


def get_config(arg=None):
    return release_recipe("nabirds", arg, bits=48, epochs=50)
