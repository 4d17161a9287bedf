r"""ImageNet-100, the release's default data set (100 classes, mAP@1000).

Command (a GPU, the data prepared as docs/data.md says):

  python train.py --config configs/imagenet100.py:bits=64 --workdir runs/imagenet100_64

The release's protocol (DeepHash list files train.txt / database.txt / test.txt under
--config.data.list_dir, image paths relative to --config.data.image_root).
Expected: not yet measured by us. Other people's results on this protocol: CSQ with ResNet-50 at
64 bits, 0.873 (CSQ paper) / 0.881 (DeepHash-pytorch rerun); CSCE-Net claims to beat them. The
release trains 500 epochs; pass :epochs=500 to match it exactly.
"""

from csce_jax.config import release_recipe


def get_config(arg=None):
    return release_recipe("imagenet100", arg, bits=64, epochs=100)
