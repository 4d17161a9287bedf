"""Sources, decoding of awkward images, list files, folders, manual layouts, digits, tfds mocks."""

import shutil

import numpy as np
import pytest
from conftest import run_module
from PIL import Image

from csce_jax.config import data_config
from csce_jax.data import DataError, EvalLoader, TrainLoader, ViewConfig, load_data
from csce_jax.data.digits import digits_sources
from csce_jax.data.images import load_rgb
from csce_jax.data.official import aircraft_sources
from csce_jax.data.sources import folder_source, list_file_source

VIEW = ViewConfig(resize=40, crop=32, flip=True)


def _save(path, mode, size=(48, 40), fmt=None, color=None):
    rng = np.random.default_rng(abs(hash(str(path))) % 2**32)
    channels = {"L": 1, "RGB": 3, "RGBA": 4, "CMYK": 4}[mode]
    arr = rng.integers(0, 255, (size[1], size[0], channels), dtype=np.uint8)
    img = Image.fromarray(
        arr[..., 0] if channels == 1 else arr, mode=mode if mode != "RGB" else None
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format=fmt)
    return path


@pytest.fixture
def image_tree(tmp_path):
    """root/<class>/: RGB and grayscale JPEG, CMYK JPEG, PNG with alpha, a truncated JPEG."""
    root = tmp_path / "images"
    _save(root / "cat" / "rgb.jpg", "RGB")
    _save(root / "cat" / "gray.jpg", "L")
    _save(root / "dog" / "cmyk.jpg", "CMYK")
    _save(root / "dog" / "alpha.png", "RGBA")
    _save(root / "dog" / "rgb2.jpg", "RGB")
    bad = _save(root / "cat" / "truncated.jpg", "RGB", size=(120, 100))
    bad.write_bytes(bad.read_bytes()[:300])
    return root


def test_awkward_images_decode_to_rgb(image_tree):
    for name in ("cat/gray.jpg", "dog/cmyk.jpg", "dog/alpha.png"):
        img = load_rgb(str(image_tree / name))
        assert img.mode == "RGB" and img.size == (48, 40)
    # Alpha is composited over white: a fully transparent pixel becomes white.
    Image.new("RGBA", (4, 4), (10, 20, 30, 0)).save(image_tree / "clear.png")
    assert np.asarray(load_rgb(str(image_tree / "clear.png")))[0, 0].tolist() == [255, 255, 255]


def test_truncated_image_names_the_file(image_tree):
    with pytest.raises(DataError, match="truncated.jpg"):
        load_rgb(
            str(image_tree / "cat" / "truncated.jpg"), where=str(image_tree / "cat/truncated.jpg")
        )


def test_folder_source_and_corrupt_handling(image_tree):
    src, classes = folder_source(image_tree)
    assert classes == ["cat", "dog"] and len(src) == 6
    assert sorted(src.labels.tolist()) == [0, 0, 0, 1, 1, 1]
    loader = EvalLoader(src, global_batch=4, view=VIEW)
    with pytest.raises(DataError, match="truncated.jpg"):
        list(loader.batches())
    loader = EvalLoader(src, global_batch=4, view=VIEW, skip_corrupt=True)
    batches = list(loader.batches())
    mask = np.concatenate([(b["index"] >= 0) for b in batches])
    assert mask.sum() == 5 and len(mask) == 8 and loader.corrupt.count == 1
    assert all(b["image"].shape == (4, 32, 32, 3) and b["image"].dtype == np.uint8 for b in batches)


def _write_list(path, rows):
    path.write_text("".join(f"{name} {' '.join(map(str, vec))}\n" for name, vec in rows))


def test_list_file_source_single_and_multi_label(image_tree, tmp_path):
    lst = tmp_path / "train.txt"
    _write_list(
        lst, [("cat/rgb.jpg", [1, 0, 0]), ("dog/cmyk.jpg", [0, 0, 1]), ("dog/alpha.png", [0, 1, 0])]
    )
    src = list_file_source(lst, image_root=image_tree, multilabel=False)
    assert src.labels.tolist() == [0, 2, 1]
    multi = tmp_path / "multi.txt"
    _write_list(multi, [("cat/rgb.jpg", [1, 1, 0]), ("dog/rgb2.jpg", [0, 0, 1])])
    src = list_file_source(multi, image_root=image_tree, multilabel=True)
    assert src.labels.tolist() == [[1, 1, 0], [0, 0, 1]]
    with pytest.raises(
        DataError, match=r"multi.txt:1: more than one 1 in the label vector of a single-label"
    ):
        list_file_source(multi, image_root=image_tree, multilabel=False)


def test_missing_listed_file_names_file_and_line(image_tree, tmp_path):
    lst = tmp_path / "test.txt"
    _write_list(lst, [("cat/rgb.jpg", [1, 0]), ("cat/nope.jpg", [1, 0])])
    with pytest.raises(DataError, match=r"nope.jpg \(.*test.txt:2\)"):
        list_file_source(lst, image_root=image_tree, multilabel=False)
    src = list_file_source(lst, image_root=image_tree, multilabel=False, skip_missing=True)
    assert len(src) == 1
    bad = tmp_path / "bad.txt"
    bad.write_text("cat/rgb.jpg 1 x\n")
    with pytest.raises(DataError, match="bad.txt:1: label values must be 0 or 1"):
        list_file_source(bad, image_root=image_tree, multilabel=False)


def test_list_protocol_through_load_data(image_tree, tmp_path):
    for f in ("train", "database", "test"):
        _write_list(
            tmp_path / f"{f}.txt",
            [
                ("cat/rgb.jpg", [1, 0]),
                ("dog/rgb2.jpg", [0, 1]),
                ("cat/gray.jpg", [1, 0]),
                ("dog/cmyk.jpg", [0, 1]),
            ],
        )
    cfg = data_config("lists")
    cfg.list_dir, cfg.image_root = str(tmp_path), str(image_tree)
    data = load_data(cfg)
    assert data.topk is None and not data.multilabel and data.num_classes == 2
    assert len(data.database) == 4 and len(data.query) == 4 and len(data.train) == 4
    cfg.name = "imagenet100"  # the preset: 100 classes, mAP@1000
    with pytest.raises(DataError, match=r"train.txt:1: a label vector of 2 values, but 100"):
        load_data(cfg)


def test_aircraft_manual_layout_and_messages(tmp_path):
    cfg = data_config("aircraft")
    with pytest.raises(
        DataError, match=r"fgvc-aircraft-2013b.tar.gz, then pass --config.data.manual_dir="
    ):
        load_data(cfg)
    with pytest.raises(
        DataError,
        match=r"variants.txt not found: download https://www.robots.*fgvc-aircraft-2013b.tar.gz",
    ):
        aircraft_sources(tmp_path)
    base = tmp_path / "fgvc-aircraft-2013b" / "data"
    base.mkdir(parents=True)
    (base / "variants.txt").write_text("707-320\nA300B4\n")
    (base / "images_variant_trainval.txt").write_text("0001 707-320\n0002 A300B4\n")
    (base / "images_variant_test.txt").write_text("0003 A300B4\n")
    for i in ("0001", "0002", "0003"):
        _save(base / "images" / f"{i}.jpg", "RGB")
    cfg.manual_dir = str(tmp_path)
    with pytest.raises(DataError, match="train: found 2, documented 6667"):
        load_data(cfg)
    cfg.allow_size_mismatch = True
    cfg.val_fraction = 0.0
    data = load_data(cfg)
    assert data.train.labels.tolist() == [0, 1] and data.query.labels.tolist() == [1]


def test_digits_split():
    train, query = digits_sources()
    assert len(train) == 1497 and len(query) == 300
    assert np.bincount(query.labels).tolist() == [30] * 10
    img = train[0]["image"]
    assert img.shape == (32, 32) and img.dtype == np.uint8 and img.max() == 255 and img.min() == 0
    assert not set(train.where) & set(query.where)
    t2, _q2 = digits_sources()
    np.testing.assert_array_equal(train.labels, t2.labels)


def test_validation_split_is_stratified_and_seeded():
    cfg = data_config("digits")
    data = load_data(cfg)
    assert len(data.val) + len(data.fit) == 1497
    counts = np.bincount(data.val.labels, minlength=10)
    assert counts.min() >= 14 and counts.max() <= 16
    assert not set(data.val.where) & set(data.fit.where)
    again = load_data(cfg)
    assert list(again.val.where) == list(data.val.where)


TFDS_SETS = {
    "cub200": 200,
    "stanford_dogs": 120,
    "cars196": 196,
    "food101": 101,
    "oxford_flowers102": 102,
}


@pytest.mark.parametrize("name", sorted(TFDS_SETS))
def test_tfds_builders_with_mock_data(name):
    import tensorflow_datasets as tfds

    cfg = data_config(name)
    cfg.allow_size_mismatch = True
    cfg.val_fraction = 0.0
    cfg.resize, cfg.crop = 40, 32
    with tfds.testing.mock_data(num_examples=6):
        data = load_data(cfg)
        assert data.num_classes == TFDS_SETS[name] and data.topk is None
        assert len(data.train) == 6 and len(data.query) == 6
        loader = TrainLoader(
            data.fit, global_batch=4, num_steps=2, seed=0, view=ViewConfig(40, 32, True)
        )
        batch = next(loader.batches())
    assert batch["image"].shape == (4, 32, 32, 3) and batch["image"].dtype == np.uint8
    assert batch["label"].shape == (4,)


def test_nabirds_and_vegfru_manual_layouts(tmp_path):
    from csce_jax.data.official import nabirds_sources, vegfru_sources

    nb = tmp_path / "nabirds"
    for name in ["a/1.jpg", "a/2.jpg", "b/3.jpg"]:
        _save(nb / "images" / name, "RGB")
    (nb / "images.txt").write_text("id1 a/1.jpg\nid2 a/2.jpg\nid3 b/3.jpg\n")
    (nb / "image_class_labels.txt").write_text("id1 817\nid2 295\nid3 817\n")
    (nb / "train_test_split.txt").write_text("id1 1\nid2 1\nid3 0\n")
    train, test = nabirds_sources(tmp_path)
    assert train.labels.tolist() == [1, 0] and test.labels.tolist() == [1]  # ids 295, 817 -> 0, 1
    vf = tmp_path / "vegfru"
    _save(vf / "veg200_images" / "x" / "1.jpg", "RGB")
    _save(vf / "fru92_images" / "y" / "2.jpg", "RGB")
    (vf / "vegfru_list").mkdir()
    (vf / "vegfru_list" / "vegfru_train.txt").write_text(
        "veg200_images/x/1.jpg 0\nfru92_images/y/2.jpg 291\n"
    )
    (vf / "vegfru_list" / "vegfru_test.txt").write_text("veg200_images/x/missing.jpg 0\n")
    with pytest.raises(DataError, match=r"missing.jpg \(.*vegfru_test.txt:1\)"):
        vegfru_sources(tmp_path)
    train, test = vegfru_sources(tmp_path, skip_missing=True)
    assert train.labels.tolist() == [0, 291] and len(test) == 0


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("veg200_images/x/1.jpg", "vegfru_train.txt:2: expected `<image path> <class number>`"),
        ("veg200_images/x/1.jpg 3.5", "vegfru_train.txt:2: expected .*found 'veg200_images"),
        ("veg200_images/x/1.jpg \u0663", "vegfru_train.txt:2: expected `<image path>"),
    ],
)
def test_vegfru_lines_without_a_whole_label_are_one_line(tmp_path, line, message):
    from csce_jax.data.official import vegfru_sources

    vf = tmp_path / "vegfru"
    _save(vf / "veg200_images" / "x" / "1.jpg", "RGB")
    (vf / "vegfru_list").mkdir()
    (vf / "vegfru_list" / "vegfru_train.txt").write_text(f"veg200_images/x/1.jpg 0\n{line}\n")
    (vf / "vegfru_list" / "vegfru_test.txt").write_text("veg200_images/x/1.jpg 0\n")
    with pytest.raises(DataError, match=message):
        vegfru_sources(tmp_path)


def test_list_files_name_bad_bytes_and_keep_paths_as_written(image_tree, tmp_path):
    """A non-UTF-8 byte is named by file, line and column; a byte order mark is not part of
    the first path; a path with a space is named (and found) as it is written."""
    bad = tmp_path / "latin1.txt"
    bad.write_bytes(b"cat/rgb.jpg 1 0\ncat/caf\xe9.jpg 0 1\n")
    with pytest.raises(DataError, match=r"latin1.txt:2: not UTF-8 text \(byte 0xe9 at column 8\)"):
        list_file_source(bad, image_root=image_tree, multilabel=False)
    bom = tmp_path / "bom.txt"
    bom.write_bytes("cat/rgb.jpg 1 0\ndog/rgb2.jpg 0 1\n".encode("utf-8-sig"))
    assert len(list_file_source(bom, image_root=image_tree, multilabel=False)) == 2
    (image_tree / "my cat").mkdir()
    shutil.copy(image_tree / "cat" / "rgb.jpg", image_tree / "my cat" / "a b.jpg")
    spaced = tmp_path / "spaced.txt"
    spaced.write_text("my cat/a b.jpg 1 0\nmy cat/gone now.jpg 0 1\n")
    with pytest.raises(DataError, match=r"my cat/gone now.jpg \(.*spaced.txt:2\)"):
        list_file_source(spaced, image_root=image_tree, multilabel=False)
    src = list_file_source(spaced, image_root=image_tree, multilabel=False, skip_missing=True)
    assert len(src) == 1 and str(src[0]["image"]).endswith("my cat/a b.jpg")


def test_split_lists_command_writes_counts_and_checksums(tmp_path):
    import hashlib

    def splits(out):
        return run_module("-m", "csce_jax.commands.splits", "--dataset", "digits", "--out", out)

    out = splits(str(tmp_path))
    assert out.returncode == 0, out.stderr[-2000:]
    lines = {ln.split()[0]: ln.split() for ln in out.stdout.strip().splitlines()}
    assert lines["train.txt"][1] == "1497" and lines["test.txt"][1] == "300"
    assert lines["val.txt"][1] == "149"
    text = (tmp_path / "test.txt").read_text()
    assert lines["test.txt"][3] == hashlib.sha256(text.encode()).hexdigest()
    first = text.splitlines()[0].split()
    assert first[0].startswith("digits/query[") and len(first) == 11 and first[1:].count("1") == 1
    again = tmp_path / "again"
    rerun = splits(str(again))
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert (again / "val.txt").read_text() == (tmp_path / "val.txt").read_text()
    bad = run_module(
        "-m",
        "csce_jax.commands.splits",
        "--dataset=aircraft",
        f"--out={tmp_path / 'x'}",
        f"--manual_dir={tmp_path / 'none'}",
    )
    assert bad.returncode != 0 and "does not exist" in bad.stderr
