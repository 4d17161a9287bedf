r"""Stanford Cars (tfds cars196; 8,144 train / 8,041 test, 196 classes).

Command (a GPU, the data prepared as the README says):

  python train.py --config configs/cars196.py:bits=48 --workdir runs/cars196_48

Fine-grained protocol: database = training set, query = test set, mAP over the whole database.
Expected: not yet measured by us. For orientation only (other people's method and runs),
SEMICON's published logs reach mAP 0.378 / 0.635 / 0.726 / 0.796 on CUB at 12 / 24 / 32 / 48 bits.
"""

from configs.common import release_recipe


def get_config(arg=None):
    return release_recipe("cars196", arg, bits=48, epochs=100, train_size=8144)
