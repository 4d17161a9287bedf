r"""FGVC-Aircraft 2013b, variants (manual_dir; 6,667 trainval / 3,333 test, 100 classes).

Command (a GPU, the data prepared as docs/data.md says):

  python train.py --config configs/aircraft.py:bits=48 --workdir runs/aircraft_48

Fine-grained protocol: database = training set, query = test set, mAP over the whole database.
Expected: not yet measured by us.
Add --config.data.manual_dir=/path/holding/fgvc-aircraft-2013b.
"""

from csce_jax.config import release_recipe


def get_config(arg=None):
    return release_recipe("aircraft", arg, bits=48, epochs=100)
