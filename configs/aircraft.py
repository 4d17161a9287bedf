r"""FGVC-Aircraft 2013b, variants (manual_dir; 6,667 trainval / 3,333 test, 100 classes).

Command (a GPU, the data prepared as the README says):

  python train.py --config configs/aircraft.py:bits=48 --workdir runs/aircraft_48

Fine-grained protocol: database = training set, query = test set, mAP over the whole database.
Expected: not yet measured by us. For orientation only (other people's method and runs),
SEMICON's published logs reach mAP 0.378 / 0.635 / 0.726 / 0.796 on CUB at 12 / 24 / 32 / 48 bits.
Add --config.data.manual_dir=/path/holding/fgvc-aircraft-2013b.
"""

from configs.common import release_recipe


def get_config(arg=None):
    return release_recipe("aircraft", arg, bits=48, epochs=100, train_size=6667)
