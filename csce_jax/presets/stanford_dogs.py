r"""Stanford Dogs (tfds stanford_dogs; 12,000 train / 8,580 test, 120 classes).

Command (a GPU, the data prepared as docs/data.md says):

  python train.py --config configs/stanford_dogs.py:bits=48 --workdir runs/stanford_dogs_48

Fine-grained protocol: database = training set, query = test set, mAP over the whole database.
Expected: not yet measured by us.
"""

from csce_jax.config import release_recipe


def get_config(arg=None):
    return release_recipe("stanford_dogs", arg, bits=48, epochs=100)
