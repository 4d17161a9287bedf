"""The embedded demo data set: scikit-learn's handwritten digits (1,797 real 8x8 images, 10 classes,
BSD licence; shipped inside scikit-learn, so nothing is downloaded).

Images are scaled from 0..16 to 0..255 and upscaled to 32x32 grey (nearest), then served as RGB
through the same pipeline as every other data set. Fixed seeded, stratified split: 30 images per
class (300) are the query set; the other 1,497 are the training set, which is also the retrieval
database (the fine-grained protocol).
"""

from __future__ import annotations

import numpy as np

from csce_jax.data.base import Source

QUERY_PER_CLASS = 30
SPLIT_SEED = 20221012


def digits_images() -> tuple[np.ndarray, np.ndarray]:
    """All 1,797 digits as uint8 (N, 32, 32) and their labels (N,)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    img = np.clip(np.round(d.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    img = img.repeat(4, axis=1).repeat(4, axis=2)
    return img, d.target.astype(np.int32)


def digits_sources() -> tuple[Source, Source]:
    """(train = database: 1,497, query: 300) with the fixed split."""
    images, labels = digits_images()
    rng = np.random.default_rng(SPLIT_SEED)
    query = np.sort(
        np.concatenate(
            [
                rng.choice(np.flatnonzero(labels == c), QUERY_PER_CLASS, replace=False)
                for c in range(10)
            ]
        )
    )
    train = np.setdiff1d(np.arange(len(labels)), query)

    def make(idx, split):
        return Source(
            list(images[idx]), labels[idx], [f"digits/{split}[{i}]" for i in idx], f"digits/{split}"
        )

    return make(train, "train"), make(query, "query")
