r"""Stanford Cars (tfds cars196; 8,144 train / 8,041 test, 196 classes).

Command (a GPU, the data prepared as docs/data.md says):

  python train.py --config configs/cars196.py:bits=48 --workdir runs/cars196_48

Fine-grained protocol: database = training set, query = test set, mAP over the whole database.
Expected: not yet measured by us.
"""

from csce_jax.config import release_recipe


def get_config(arg=None):
    return release_recipe("cars196", arg, bits=48, epochs=100)
