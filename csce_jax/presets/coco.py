r"""MS-COCO (multi-label, 80 labels, mAP@5000).

Command (a GPU, the data prepared as docs/data.md says):

  python train.py --config configs/coco.py:bits=64 --workdir runs/coco_64

The release's protocol (DeepHash list files train.txt / database.txt / test.txt under
--config.data.list_dir, image paths relative to --config.data.image_root).
Expected: not yet measured by us.
"""

from csce_jax.config import release_recipe


def get_config(arg=None):
    return release_recipe("coco", arg, bits=64, epochs=100)
