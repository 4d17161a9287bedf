"""Determinism, per-host sharding, exact resume and padded evaluation of the grain pipelines."""

import numpy as np
import pytest

from csce_jax.data import EvalLoader, TrainLoader, ViewConfig, Workers
from csce_jax.data.base import Source

VIEW = ViewConfig(resize=20, crop=16, flip=True)


@pytest.fixture(scope="module")
def source():
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (24, 20, 3), dtype=np.uint8) for _ in range(37)]
    return Source(images, np.arange(37) % 5, [f"img{i}" for i in range(37)], "toy")


def _run(source, steps=8, start=0, **kw):
    args = {"global_batch": 8, "num_steps": steps, "seed": 3, "view": VIEW, "workers": Workers(2)}
    args.update(kw)
    return list(TrainLoader(source, **args).batches(start))


def test_same_seed_same_batches(source):
    a, b = _run(source), _run(source)
    assert len(a) == 8
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["index"], y["index"])
    c = _run(source, seed=4)
    assert any(not np.array_equal(x["index"], y["index"]) for x, y in zip(a, c, strict=True))


def test_epochs_cover_the_split_and_reshuffle(source):
    idx = np.concatenate([b["index"] for b in _run(source, steps=9)])  # 72 = 37 + 35
    assert sorted(idx[:37]) == list(range(37))
    assert not np.array_equal(idx[:35], idx[37:72])


def test_two_hosts_get_disjoint_halves_of_each_global_batch(source):
    one = _run(source)
    h0 = _run(source, process_index=0, process_count=2)
    h1 = _run(source, process_index=1, process_count=2)
    for g, a, b in zip(one, h0, h1, strict=True):
        assert a["image"].shape == (4, 16, 16, 3)
        np.testing.assert_array_equal(np.concatenate([a["index"], b["index"]]), g["index"])
        # Pixels (including the random crop and flip) do not depend on the host count.
        np.testing.assert_array_equal(np.concatenate([a["image"], b["image"]]), g["image"])


def test_host_shards_are_disjoint_and_cover_an_epoch():
    rng = np.random.default_rng(1)
    src = Source(
        [rng.integers(0, 255, (20, 20, 3), dtype=np.uint8) for _ in range(32)],
        np.zeros(32, np.int32),
        [f"i{i}" for i in range(32)],
        "toy32",
    )
    shards = [
        np.concatenate([b["index"] for b in _run(src, steps=4, process_index=h, process_count=2)])
        for h in (0, 1)
    ]
    assert not set(shards[0]) & set(shards[1])
    assert sorted(np.concatenate(shards)) == list(range(32))


def test_resume_mid_epoch_continues_exactly(source):
    straight = _run(source, steps=8)
    resumed = _run(source, steps=8, start=3)  # step 3 is inside the first epoch (37 // 8 = 4)
    assert len(resumed) == 5
    for x, y in zip(straight[3:], resumed, strict=True):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["label"], y["label"])


def test_eval_pads_and_masks_so_hosts_run_equal_steps(source):
    whole = list(EvalLoader(source, global_batch=8, view=VIEW).batches())
    assert len(whole) == 5  # ceil(37 / 8)
    mask = np.concatenate([(b["index"] >= 0) for b in whole])
    idx = np.concatenate([b["index"] for b in whole])
    assert mask.sum() == 37 and idx[mask].tolist() == list(range(37)) and (idx[~mask] == -1).all()
    parts = [
        list(
            EvalLoader(
                source, global_batch=8, view=VIEW, process_index=h, process_count=2
            ).batches()
        )
        for h in (0, 1)
    ]
    assert len(parts[0]) == len(parts[1]) == 5
    joined = np.concatenate(
        [np.concatenate([a["index"], b["index"]]) for a, b in zip(*parts, strict=True)]
    )
    np.testing.assert_array_equal(joined, idx)
    np.testing.assert_array_equal(
        whole[0]["image"], np.concatenate([parts[0][0]["image"], parts[1][0]["image"]])
    )


def test_worker_processes_give_the_threads_batches(source):
    """Decoding in processes changes nothing: same pixels, same order, also when resuming."""
    threads = _run(source, steps=5, start=1)
    processes = _run(source, steps=5, start=1, workers=Workers(2, processes=True))
    assert len(processes) == len(threads) == 4
    for x, y in zip(threads, processes, strict=True):
        assert set(x) == set(y) == {"image", "flip", "label", "index"}
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])


LEAVES_THE_LOADER_EARLY = """import numpy as np

from csce_jax.data import TrainLoader, ViewConfig, Workers
from csce_jax.data.base import Source


def main():
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (24, 20, 3), dtype=np.uint8) for _ in range(37)]
    src = Source(images, np.arange(37) % 5, [f"img{i}" for i in range(37)], "toy")
    loader = TrainLoader(
        src,
        global_batch=8,
        num_steps=6,
        seed=3,
        view=ViewConfig(resize=20, crop=16, flip=True),
        workers=Workers(2, processes=True),
    )
    batches = loader.batches()
    kept = [next(batches) for _ in range(3)]  # left early, the last batches still held
    print(sum(int(b["image"].sum() > 0) for b in kept), flush=True)


if __name__ == "__main__":
    main()
"""


def test_batches_from_worker_processes_leave_no_shared_memory_at_exit(tmp_path):
    """Batches from decoding processes live in shared memory: a program that leaves the
    loader early, still holding batches, ends without the resource tracker's leak warning."""
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "leaves_early.py"
    script.write_text(LEAVES_THE_LOADER_EARLY)
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env={**__import__("os").environ, "PYTHONPATH": str(root)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["3"], done.stdout
    assert "leaked shared_memory" not in done.stderr, done.stderr[-3000:]


def test_a_skip_in_a_worker_process_is_counted_once_by_the_loader(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(2)
    paths = []
    for i in range(6):
        paths.append(tmp_path / f"{i}.jpg")
        Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(paths[-1])
    paths[3].write_bytes(paths[3].read_bytes()[:40])  # truncated
    src = Source([str(p) for p in paths], np.zeros(6, np.int32), [str(p) for p in paths], "six")
    view = ViewConfig(resize=20, crop=16, flip=False)
    workers = Workers(2, processes=True)
    train = TrainLoader(
        src, global_batch=3, num_steps=4, seed=0, view=view, workers=workers, skip_corrupt=True
    )
    assert sum(len(b["image"]) for b in train.batches()) == 12
    assert train.corrupt.names == {str(paths[3])}  # drawn twice in two epochs, counted once
    evaluate = EvalLoader(src, global_batch=4, view=view, workers=workers, skip_corrupt=True)
    mask = np.concatenate([(b["index"] >= 0) for b in evaluate.batches()])
    assert mask.tolist() == [True] * 3 + [False] + [True] * 2 + [False] * 2
    assert evaluate.corrupt.names == {str(paths[3])}


def test_training_order_is_grains_shuffled_stream():
    """The per-epoch cache gives grain's own order: range(n).shuffle(seed).repeat()."""
    import grain

    from csce_jax.data.base import Source

    n = 37
    src = Source(list(range(n)), np.zeros(n, np.int32), [str(i) for i in range(n)], "order")
    loader = TrainLoader(src, global_batch=4, num_steps=30, seed=5, view=VIEW)
    stream = grain.MapDataset.range(n).shuffle(seed=5).repeat(4)
    assert [loader.record_at(p) for p in range(4 * n)] == [stream[p] for p in range(4 * n)]


def test_training_crops_come_unflipped_with_the_flip_to_apply():
    """apply_flips(batch) is the release's flip-then-crop of each resized image."""
    from csce_jax.data.images import random_crop
    from csce_jax.data.pipeline import apply_flips

    rng = np.random.default_rng(1)
    images = [rng.integers(0, 255, (20, 20 + i, 3), dtype=np.uint8) for i in range(8)]
    src = Source(images, np.zeros(8, np.int32), [str(i) for i in range(8)], "flips")
    view = ViewConfig(resize=20, crop=16, flip=True)
    loader = TrainLoader(src, global_batch=8, num_steps=1, seed=2, view=view)
    batch = next(iter(loader.batches()))
    assert batch["flip"].dtype == bool and 0 < batch["flip"].sum() < 8
    for k in range(8):
        expect = random_crop(
            images[batch["index"][k]], np.random.default_rng((2, k)), crop=16, flip=True
        )
        np.testing.assert_array_equal(apply_flips(batch["image"], batch["flip"])[k], expect)
