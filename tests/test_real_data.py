"""Real-photograph routes: any DeepHash list files, Flowers-102 from its official files (and
the tfds builder's reading of the same files), and the release's resize and crops."""

from __future__ import annotations

import gc
import tarfile
from unittest import mock

import numpy as np
import pytest
from PIL import Image
from scipy import io as sio

from csce_jax.config import data_config
from csce_jax.data import load_data
from csce_jax.data import sources as S
from csce_jax.data.datasets import _check_labels
from csce_jax.data.images import (
    center_crop,
    random_crop,
    resize_shorter,
    resized_rgb,
    resized_size,
)
from csce_jax.errors import DataError


def _jpeg(path, size=(40, 32), seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def _lists(folder, files):
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in files.items():
        (folder / name).write_text("".join(f"{p} {' '.join(map(str, v))}\n" for p, v in rows))


@pytest.fixture
def list_tree(tmp_path):
    """12 images of 5 classes and list files train / database / test / val."""
    root = tmp_path / "img"
    names = [f"c{i % 5}/im{i}.jpg" for i in range(12)]
    for i, n in enumerate(names):
        _jpeg(root / n, seed=i)

    def row(i):
        return names[i], np.eye(5, dtype=int)[i % 5].tolist()

    _lists(
        tmp_path / "lists",
        {
            "train.txt": [row(i) for i in range(8)],
            "database.txt": [row(i) for i in range(8)],
            "test.txt": [row(i) for i in range(8, 12)],
            "val.txt": [row(i) for i in (0, 1)],
        },
    )
    return tmp_path


def _cfg(tree, name="lists"):
    cfg = data_config(name)
    cfg.list_dir, cfg.image_root = str(tree / "lists"), str(tree / "img")
    return cfg


def test_query_images_that_are_also_database_images_are_warned_about(list_tree, caplog):
    with caplog.at_level("WARNING"):
        load_data(_cfg(list_tree))
    assert "also in the database" not in caplog.text
    test = list_tree / "lists" / "test.txt"
    database = (list_tree / "lists" / "database.txt").read_text().splitlines()
    test.write_text(test.read_text() + database[0] + "\n" + database[3] + "\n")
    with caplog.at_level("WARNING"):
        load_data(_cfg(list_tree))
    assert "2 of the 6 query images are also in the database" in caplog.text


def test_lists_any_class_count_with_val_file(list_tree):
    data = load_data(_cfg(list_tree))
    assert data.num_classes == 5 and not data.multilabel and data.topk is None
    assert len(data.train) == 8 and len(data.database) == 8 and len(data.query) == 4
    # val.txt is the validation split; its images leave the fit part of train.txt.
    assert len(data.val) == 2 and len(data.fit) == 6
    assert not set(data.val.images) & set(data.fit.images)
    assert data.query.labels.tolist() == [3, 4, 0, 1]


def test_lists_multilabel_detected_or_forced(list_tree):
    lists = list_tree / "lists"
    rows = (lists / "test.txt").read_text().splitlines()
    rows[0] = rows[0].rsplit(" ", 5)[0] + " 1 1 0 0 1"
    (lists / "test.txt").write_text("\n".join(rows) + "\n")
    data = load_data(_cfg(list_tree))
    assert data.multilabel and data.query.labels.shape == (4, 5)
    cfg = _cfg(list_tree)
    cfg.multilabel = "false"
    with pytest.raises(DataError, match=r"test.txt:1: more than one 1"):
        load_data(cfg)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("c0/im0.jpg 1 0 0 0 0", r"train.txt:9: c0/im0.jpg is listed twice \(first on line 1\)"),
        ("c1/none.jpg 0 1 0 0 0", r"none.jpg \(.*train.txt:9\)"),
        ("c1/im1.jpg 0 0 0 0 0", r"train.txt:9: the label vector has no 1"),
        ("c1/im1.jpg 0 2 0 0 0", r"train.txt:9: label values must be 0 or 1, found '2'"),
        ("c1/im1.jpg 0 1 0 0", r"train.txt:9: a label vector of 4 values, but 5 are expected"),
    ],
)
def test_bad_list_line_is_named_or_skipped(list_tree, line, message):
    train = list_tree / "lists" / "train.txt"
    train.write_text(train.read_text() + line + "\n")
    with pytest.raises(DataError, match=message):
        load_data(_cfg(list_tree))
    cfg = _cfg(list_tree)
    cfg.skip_corrupt = True
    assert len(load_data(cfg).train) == 8  # the bad line skipped, the rest kept


def test_list_width_must_agree_across_files_and_empty_files(list_tree):
    lists = list_tree / "lists"
    _lists(lists, {"test.txt": [("c0/im0.jpg", [1, 0, 0])]})
    with pytest.raises(DataError, match=r"test.txt:1: a label vector of 3 values, but 5"):
        load_data(_cfg(list_tree))
    (lists / "test.txt").write_text("\n")
    with pytest.raises(DataError, match=r"test.txt: no usable line"):
        load_data(_cfg(list_tree))


def test_presets_fix_class_count_and_cutoff(list_tree):
    with pytest.raises(DataError, match=r"train.txt:1: a label vector of 5 values, but 21"):
        load_data(_cfg(list_tree, "nuswide21"))
    assert S.ListFile(list_tree / "lists" / "train.txt", list_tree / "img").width == 5


def test_labels_outside_the_class_count_are_refused():
    src = S.Source(["a.jpg", "b.jpg"], np.array([3, -1]), ["a.jpg (l:1)", "b.jpg (l:2)"], "x")
    with pytest.raises(DataError, match=r"label -1 of b.jpg \(l:2\) is outside 0..291"):
        _check_labels("vegfru", src, 292, False)
    src.labels = np.array([3, 292])
    with pytest.raises(DataError, match=r"label 292 of b.jpg"):
        _check_labels("vegfru", src, 292, False)


# --- Oxford Flowers-102 in its official layout -------------------------------------------------

SPLIT_IDS = {"trnid": [3, 1, 10, 7], "valid": [2, 11, 5, 12], "tstid": [4, 6, 8, 9, 13, 14]}


def _flowers(folder, archive=False):
    """A miniature of the official files: 14 images, labels 1..102 in imagelabels.mat."""
    labels = np.array([[5, 1, 102, 5, 1, 102, 7, 7, 5, 1, 102, 7, 1, 5]], np.uint8)
    jpg = folder / "stage" / "jpg" if archive else folder / "jpg"
    for i in range(1, 15):
        _jpeg(jpg / f"image_{i:05d}.jpg", size=(30 + i, 24), seed=i)
    if archive:
        with tarfile.open(folder / "102flowers.tgz", "w:gz") as tar:
            tar.add(jpg, arcname="jpg")
    sio.savemat(folder / "imagelabels.mat", {"labels": labels})
    sio.savemat(folder / "setid.mat", {k: np.array([v], np.uint16) for k, v in SPLIT_IDS.items()})
    return labels[0]


def _flowers_cfg(folder):
    cfg = data_config("oxford_flowers102")
    cfg.manual_dir, cfg.allow_size_mismatch = str(folder), True
    return cfg


@pytest.mark.parametrize("archive", [False, True])
def test_flowers_official_files(tmp_path, archive):
    folder = tmp_path / "flowers"
    labels = _flowers(folder, archive)
    data = load_data(_flowers_cfg(folder))
    assert data.num_classes == 102 and data.topk is None
    assert data.database is data.train and data.fit is data.train
    for src, key in ((data.train, "trnid"), (data.val, "valid"), (data.query, "tstid")):
        ids = SPLIT_IDS[key]
        assert [p.rsplit("/", 1)[1] for p in src.images] == [f"image_{i:05d}.jpg" for i in ids]
        assert src.labels.tolist() == [int(labels[i - 1]) - 1 for i in ids]
    assert np.asarray(Image.open(data.query.images[0])).shape == (24, 34, 3)


def test_flowers_sizes_and_bad_files_are_named(tmp_path):
    folder = tmp_path / "flowers"
    _flowers(folder)
    cfg = _flowers_cfg(folder)
    cfg.allow_size_mismatch = False
    with pytest.raises(DataError, match=r"imagelabels.mat: 14 labels, the data set has 8189"):
        load_data(cfg)
    sio.savemat(folder / "setid.mat", {"trnid": [[1, 2]], "valid": [[2]], "tstid": [[3]]})
    with pytest.raises(DataError, match=r"image id 2 is in both train and val|in both trnid"):
        load_data(_flowers_cfg(folder))
    sio.savemat(folder / "setid.mat", {"trnid": [[1, 99]], "valid": [[2]], "tstid": [[3]]})
    with pytest.raises(DataError, match=r"setid.mat: trnid has image id 99 outside 1..14"):
        load_data(_flowers_cfg(folder))
    (folder / "setid.mat").unlink()
    with pytest.raises(DataError, match=r"setid.mat not found: download setid.mat from https://"):
        load_data(_flowers_cfg(folder))
    with pytest.raises(DataError, match=r"data.manual_dir=.*nowhere does not exist: download"):
        load_data(_flowers_cfg(tmp_path / "nowhere"))


def test_flowers_tfds_builder_reads_the_same_images_and_labels(tmp_path):
    """The tfds route (its builder's own example generator on the same official files) gives
    the manual route's file names and labels, split by split."""
    # tfds imports this module inside etils' lazy-import block, where a garbage collection
    # that finalises what earlier tests left behind cannot report it (pytest's hook imports
    # tracemalloc, and gets a lazy module): collect first, and not during the import.
    gc.collect()
    gc.disable()
    try:
        from tensorflow_datasets.datasets.oxford_flowers102 import (
            oxford_flowers102_dataset_builder as fb,
        )
    finally:
        gc.enable()

    folder = tmp_path / "flowers"
    _flowers(folder)
    data = load_data(_flowers_cfg(folder))
    gfile = mock.Mock()
    gfile.io.gfile.GFile = open
    builder = fb.Builder.__new__(fb.Builder)
    for ours, split in ((data.train, "trnid"), (data.val, "valid"), (data.query, "tstid")):
        with mock.patch.object(fb, "tf", gfile):
            examples = dict(
                builder._generate_examples(
                    str(folder / "jpg"),
                    str(folder / "imagelabels.mat"),
                    str(folder / "setid.mat"),
                    split,
                )
            )
        theirs = {k: (v["image"], int(v["label"])) for k, v in examples.items()}
        mine = {
            p.rsplit("/", 1)[1]: (p, int(lab))
            for p, lab in zip(ours.images, ours.labels, strict=True)
        }
        assert mine == theirs


# --- The release's resize and crops --------------------------------------------------------

# (width, height) -> size after torchvision Resize(256): the long side truncated.
RECORDED_SIZES = {
    (300, 437): (256, 372),
    (437, 300): (372, 256),
    (500, 375): (341, 256),
    (333, 500): (256, 384),
    (299, 401): (256, 343),
    (255, 256): (256, 257),
    (301, 1000): (256, 850),
    (256, 256): (256, 256),
    (1000, 257): (996, 256),
}


@pytest.mark.parametrize(("size", "expected"), RECORDED_SIZES.items())
def test_resize_truncates_the_long_side_as_torchvision(size, expected):
    assert resized_size(*size, 256) == expected
    img = Image.new("RGB", size, (10, 20, 30))
    assert resize_shorter(img, 256).size == expected


def test_crops_follow_the_release_order():
    arr = np.arange(6 * 8 * 3, dtype=np.uint8).reshape(6, 8, 3)
    c = center_crop(arr, 4)
    assert c.base is not None and np.array_equal(c, arr[1:5, 2:6])
    seen_flip = set()
    for seed in range(40):
        rng = np.random.default_rng(seed)
        flipped = rng.random() < 0.5
        top, left = int(rng.integers(0, 3)), int(rng.integers(0, 5))
        got = random_crop(arr, np.random.default_rng(seed), crop=4, flip=True)
        src = arr[:, ::-1] if flipped else arr  # flip the resized image, then crop
        assert np.array_equal(got, src[top : top + 4, left : left + 4])
        seen_flip.add(flipped)
    assert seen_flip == {True, False}


def test_draft_decoding_is_an_option_not_the_default(tmp_path):
    path = _jpeg(tmp_path / "big.jpg", size=(600, 520))
    full = resized_rgb(str(path), 128)
    assert full.shape == (128, 147, 3)
    expect = np.asarray(resize_shorter(Image.open(path).convert("RGB"), 128))
    assert np.array_equal(full, expect)
    drafted = resized_rgb(str(path), 128, draft=True)
    assert drafted.shape == full.shape and not np.array_equal(drafted, full)


def test_resize_and_crops_equal_torchvision_transforms(tmp_path):
    """Pixel for pixel against torchvision's own transforms (where it is installed)."""
    T = pytest.importorskip("torchvision.transforms")
    import torch

    for i, size in enumerate(RECORDED_SIZES):
        img = Image.open(_jpeg(tmp_path / f"{i}.jpg", size=size, seed=i)).convert("RGB")
        ref = np.asarray(T.Resize(256)(img))
        ours = np.asarray(resize_shorter(img, 256))
        assert np.array_equal(ours, ref)
        assert np.array_equal(
            center_crop(ours, 224), np.asarray(T.CenterCrop(224)(T.Resize(256)(img)))
        )
        torch.manual_seed(i)
        flip = T.RandomHorizontalFlip()(T.Resize(256)(img))
        crop_params = T.RandomCrop.get_params(flip, (224, 224))
        top, left = crop_params[0], crop_params[1]
        mirrored = not np.array_equal(np.asarray(flip), ref)
        src = ours[:, ::-1] if mirrored else ours
        assert np.array_equal(
            np.asarray(flip)[top : top + 224, left : left + 224],
            src[top : top + 224, left : left + 224],
        )


def test_flowers_as_list_files_reads_back_to_the_same_splits(tmp_path):
    """Lists written from the official files (csce_jax.data.splits) and read with
    data.name=lists give the manual route's splits, in the same order."""
    from csce_jax.data.splits import write_lists

    folder = tmp_path / "flowers"
    _flowers(folder)
    manual = load_data(_flowers_cfg(folder))
    write_lists(_flowers_cfg(folder), tmp_path / "lists")
    cfg = data_config("lists")
    cfg.list_dir, cfg.image_root = str(tmp_path / "lists"), str(folder)
    lists = load_data(cfg)
    assert lists.num_classes == 102 and not lists.multilabel
    for name in ("train", "fit", "val", "database", "query"):
        a, b = getattr(manual, name), getattr(lists, name)
        assert [str(p) for p in a.images] == [str(p) for p in b.images], name
        assert a.labels.tolist() == b.labels.tolist(), name
