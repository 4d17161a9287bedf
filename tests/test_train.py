"""Training: the entry point end to end, sharding equivalence, exact resume, bad configs."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs.default import get_config
from csce_jax import sharding, train_lib
from csce_jax.builders import ConfigError, check_config
from csce_jax.checkpointing import Checkpoints
from csce_jax.data import DataError, load_data
from csce_jax.optim import torch_rmsprop

ROOT = Path(__file__).resolve().parents[1]
TINY_OVERRIDES = [
    "--config.batch_size=8",
    "--config.eval_batch_size=64",
    "--config.log_every_steps=1",
    "--config.data.num_threads=2",
]


def tiny_config(steps=4, linear_optimizer=False):
    """The digits demo cut down; ``linear_optimizer``: SGD at a constant rate, whose update is
    linear in the gradient (Adam's first steps are ~lr * sign(g): float noise in a near-zero
    gradient flips a whole step, which would hide real sharding differences)."""
    c = get_config()
    c.total_steps = steps
    c.batch_size = 8
    c.eval_batch_size = 64
    c.log_every_steps = 1
    c.eval_every_steps = steps
    c.checkpoint_every_steps = steps
    c.data.num_threads = 2
    if linear_optimizer:
        c.optimizer.name = "sgd"
        c.optimizer.lr = 0.05
        c.optimizer.warmup_steps = 0
        c.optimizer.schedule = "constant"
    return c


def run_train(workdir, *extra, check=True, background=False, env=None):
    cmd = [
        sys.executable,
        "train.py",
        "--config",
        "configs/default.py",
        "--workdir",
        str(workdir),
        *TINY_OVERRIDES,
        *extra,
    ]
    if background:
        return subprocess.Popen(
            cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
        )
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    if check:
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def read_rows(workdir):
    return [json.loads(x) for x in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def final_params(workdir, steps, **kw):
    c = tiny_config(steps, **kw)
    data = load_data(c.data)
    setup = train_lib.create_train_state(c, data.num_classes)
    ck = Checkpoints(workdir)
    step, state, _ = ck.restore_latest(setup.state)
    ck.close()
    assert step == steps
    return jax.tree.map(np.asarray, state["params"])


def test_three_step_run_through_the_entry_point(tmp_path):
    run_train(
        tmp_path,
        "--config.total_steps=3",
        "--config.eval_every_steps=3",
        "--config.checkpoint_every_steps=3",
    )
    rows = read_rows(tmp_path)
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3]
    for key in ("loss", "ce", "quant", "lr", "grad_norm", "param_norm", "images_per_sec"):
        assert all(np.isfinite(r[key]) for r in train_rows), key
    assert any("val_map" in r for r in rows)
    final = rows[-1]
    assert "query_map" in final and 0 <= final["query_map"] <= 1 and final["best_step"] == 3
    assert (tmp_path / "checkpoints" / "latest" / "3").is_dir()
    assert json.loads((tmp_path / "config.json").read_text())["total_steps"] == 3
    assert list((tmp_path / "tensorboard").iterdir())


def test_tfds_data_set_trains_under_mock_data(tmp_path):
    import tensorflow_datasets as tfds

    c = tiny_config(2)
    c.data.name = "cub200"
    c.data.allow_size_mismatch = True
    c.data.val_fraction = 0.0
    with tfds.testing.mock_data(num_examples=16):
        final = train_lib.train_and_evaluate(c, tmp_path)
    assert final["num_query"] == 16 and final["num_database"] == 16
    assert (tmp_path / "checkpoints" / "latest" / "2").is_dir()


def _one_step(mesh, config, batch):
    data_classes = 10
    setup = train_lib.create_train_state(config, data_classes)
    step = train_lib.make_train_step(setup.graphdef, setup.tx, setup.schedule, config, False, mesh)
    state = jax.device_put(setup.state, sharding.replicated(mesh))
    state, metrics = step(state, sharding.global_batch(mesh, batch))
    return jax.tree.map(np.asarray, state["params"]), jax.device_get(metrics)


def _update_gaps(p0, pa, pb):
    """Per-tensor ||(pa - p0) - (pb - p0)|| / ||pa - p0||, and the same over all parameters."""
    gaps, num, den = [], 0.0, 0.0
    for a, b, init in zip(
        jax.tree.leaves(pa), jax.tree.leaves(pb), jax.tree.leaves(p0), strict=True
    ):
        da, db = (a - init).astype(np.float64), (b - init).astype(np.float64)
        num, den = num + np.sum((da - db) ** 2), den + np.sum(da**2)
        if np.linalg.norm(da) > 0:
            gaps.append(np.linalg.norm(da - db) / np.linalg.norm(da))
    assert len(gaps) > 10  # the step really moved the parameters
    return np.asarray(gaps), np.sqrt(num / den)


def test_one_device_equals_four_devices():
    assert jax.device_count() == 4
    c = tiny_config(linear_optimizer=True)
    c.loss.margin_std = 0.0  # margins then do not depend on a sample's place in the batch
    rng = np.random.default_rng(0)
    batch = {
        "image": rng.integers(0, 255, (8, 112, 112, 3), dtype=np.uint8),
        "label": rng.integers(0, 10, 8).astype(np.int32),
    }
    perm = np.array([3, 1, 7, 0, 5, 2, 6, 4])
    one = jax.make_mesh(
        (1,), ("data",), devices=jax.devices()[:1], axis_types=(jax.sharding.AxisType.Auto,)
    )
    p1, m1 = _one_step(one, c, batch)
    p1_perm, _ = _one_step(one, c, {k: v[perm] for k, v in batch.items()})
    p4, m4 = _one_step(sharding.make_mesh(), c, batch)
    np.testing.assert_allclose(float(m1["loss"]), float(m4["loss"]), rtol=1e-6)
    p0 = jax.tree.map(np.asarray, train_lib.create_train_state(c, 10).state["params"])
    # Float32 reduction order alone (the same batch reordered on one device) moves this untrained
    # tiny network's early-layer updates by a few percent; four devices may differ no more.
    noise, noise_all = _update_gaps(p0, p1, p1_perm)
    gaps, gap_all = _update_gaps(p0, p1, p4)
    assert np.median(gaps) < 1e-4
    assert gap_all <= 2 * noise_all + 1e-6 and gaps.max() <= 2 * noise.max() + 1e-6


def test_exact_resume_after_kill(tmp_path):
    steps = [
        "--config.total_steps=6",
        "--config.eval_every_steps=3",
        "--config.checkpoint_every_steps=2",
    ]
    straight = tmp_path / "straight"
    run_train(straight, *steps)
    killed = tmp_path / "killed"
    proc = run_train(killed, *steps, background=True)
    deadline = time.time() + 300
    while not (killed / "checkpoints" / "latest" / "2").is_dir():
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read()[-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "checkpoints" / "latest" / "6").exists()
    run_train(killed, *steps)  # the same command resumes
    for a, b in zip(
        jax.tree.leaves(final_params(straight, 6)),
        jax.tree.leaves(final_params(killed, 6)),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)

    def comparable(rows):
        return [{k: v for k, v in r.items() if k != "images_per_sec"} for r in rows]

    assert comparable(read_rows(straight)) == comparable(read_rows(killed))


def test_sigterm_saves_and_exits_cleanly(tmp_path):
    proc = run_train(
        tmp_path,
        "--config.total_steps=400",
        "--config.eval_every_steps=400",
        "--config.checkpoint_every_steps=400",
        background=True,
    )
    deadline = time.time() + 300
    while not (tmp_path / "metrics.jsonl").exists() or len(read_rows(tmp_path)) < 3:
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-2000:]
    saved = [
        int(p.name) for p in (tmp_path / "checkpoints" / "latest").iterdir() if p.name.isdigit()
    ]
    assert len(saved) == 1 and 3 <= saved[0] < 400, (saved, out[-3000:])
    assert "preempted" in out


def test_rmsprop_matches_hand_computed_update():
    p = {"w": jnp.array([1.0, -2.0])}
    g = {"w": jnp.array([0.5, 0.1])}
    tx = torch_rmsprop(0.01, alpha=0.9, eps=1e-8, weight_decay=0.1)
    state = tx.init(p)
    # PyTorch: g' = g + wd*p = [0.6, -0.1]; v = 0.1*g'^2 = [0.036, 0.001];
    # p -= lr * g' / (sqrt(v) + eps)
    upd, state = tx.update(g, state, p)
    new = optax.apply_updates(p, upd)
    gp = np.array([0.6, -0.1])
    v = 0.1 * gp**2
    expect = np.array([1.0, -2.0]) - 0.01 * gp / (np.sqrt(v) + 1e-8)
    np.testing.assert_allclose(np.asarray(new["w"]), expect, rtol=1e-6)
    # Second step: the squared average carries over.
    upd, _ = tx.update(g, state, new)
    gp2 = np.array([0.5, 0.1]) + 0.1 * expect
    v2 = 0.9 * v + 0.1 * gp2**2
    np.testing.assert_allclose(
        np.asarray(optax.apply_updates(new, upd)["w"]),
        expect - 0.01 * gp2 / (np.sqrt(v2) + 1e-8),
        rtol=1e-6,
    )


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("bits", 0, "config.bits=0: must be a positive integer"),
        ("batch_size", 6, "config.batch_size=6: must be divisible by the 4 devices"),
        ("data.crop", 64, "config.data.crop=64: too small for 4x4 windows"),
        ("dsf.estimator", "sigmoid", "config.dsf.estimator='sigmoid': must be one of"),
    ],
)
def test_bad_config_values_fail_naming_the_key(key, value, message):
    c = tiny_config()
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
        node = node[p]
    node[leaf] = value
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_config(c, 4, 1)


def test_cli_rejects_unknown_key_and_missing_data_before_compiling(tmp_path):
    out = run_train(tmp_path, "--config.modle.width=2", check=False)
    assert out.returncode == 2
    assert "unknown config key config.modle" in out.stderr and "model" in out.stderr
    out = run_train(tmp_path, "--config.data.name=aircraft", check=False)
    assert out.returncode == 1 and "data.manual_dir is not set" in out.stderr
    assert not (tmp_path / "checkpoints").exists() or not any(
        (tmp_path / "checkpoints" / "latest").iterdir()
    )


def test_missing_data_is_a_data_error():
    c = tiny_config()
    c.data.name = "imagenet100"
    with pytest.raises(DataError, match="data.list_dir is not set"):
        load_data(c.data)


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(tmp_path):
    out = run_train(
        tmp_path,
        "--config.total_steps=4",
        "--config.checkpoint_every_steps=2",
        "--config.optimizer.lr=1e30",
        "--config.optimizer.warmup_steps=0",
        check=False,
    )
    assert out.returncode != 0
    assert "non-finite loss" in out.stdout + out.stderr
    assert os.path.isdir(tmp_path / "checkpoints")


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_process_with_four_devices(tmp_path):
    worker = str(ROOT / "tests" / "distributed_worker.py")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    single = subprocess.run(
        [sys.executable, worker, "0", "1", "0", str(tmp_path / "one")],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert single.returncode == 0, single.stderr[-3000:]
    port = str(_free_port())
    procs = [
        subprocess.Popen(
            [sys.executable, worker, port, "2", str(i), str(tmp_path / "two")],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out[-3000:]
    c = tiny_config(3, linear_optimizer=True)
    p0 = jax.tree.map(np.asarray, train_lib.create_train_state(c, 10).state["params"])
    gaps, gap_all = _update_gaps(
        p0,
        final_params(tmp_path / "one", 3, linear_optimizer=True),
        final_params(tmp_path / "two", 3, linear_optimizer=True),
    )
    # Float noise only (see test_one_device_equals_four_devices); a wrong split is O(1).
    assert np.median(gaps) < 1e-3 and gap_all < 0.05, (np.median(gaps), gap_all)
    one, two = read_rows(tmp_path / "one"), read_rows(tmp_path / "two")
    assert [r["step"] for r in one] == [r["step"] for r in two]
    np.testing.assert_allclose(one[-1]["query_map"], two[-1]["query_map"], atol=1e-6)


def test_the_step_compiles_once():
    c = tiny_config(linear_optimizer=True)
    mesh = sharding.make_mesh()
    setup = train_lib.create_train_state(c, 10)
    step = train_lib.make_train_step(setup.graphdef, setup.tx, setup.schedule, c, False, mesh)
    state = jax.device_put(setup.state, sharding.replicated(mesh))
    rng = np.random.default_rng(0)
    for _ in range(3):
        batch = {
            "image": rng.integers(0, 255, (8, 112, 112, 3), dtype=np.uint8),
            "label": rng.integers(0, 10, 8).astype(np.int32),
        }
        placed = sharding.global_batch(mesh, batch)
        with jax.transfer_guard("disallow"):  # no host round trip inside the step
            state, metrics = step(state, placed)
    assert int(state["step"]) == 3
    assert step._cache_size() == 1
    assert np.isfinite(float(metrics["loss"]))


def test_bfloat16_step_tracks_float32():
    """One step from the same initial weights and batch: bf16 compute, float32 parameters."""
    rng = np.random.default_rng(0)
    batch = {
        "image": rng.integers(0, 255, (8, 112, 112, 3), dtype=np.uint8),
        "label": rng.integers(0, 10, 8).astype(np.int32),
    }
    mesh = sharding.make_mesh()
    out = {}
    for dtype in ("float32", "bfloat16"):
        c = tiny_config(linear_optimizer=True)
        c.model.dtype = dtype
        out[dtype] = _one_step(mesh, c, batch)
    (_, m32), (p16, m16) = out["float32"], out["bfloat16"]
    assert all(v.dtype == np.float32 for v in jax.tree.leaves(p16))  # master weights stay f32
    assert np.isfinite(m16["loss"])
    # bf16 keeps 8 mantissa bits (rounding 2^-9 = 0.2 %); measured here: loss 0.2 % and gradient
    # norm 1.8 % off float32. Bounds: 1 % and 5 %.
    assert abs(m16["loss"] - m32["loss"]) <= 0.01 * abs(m32["loss"])
    assert abs(m16["grad_norm"] - m32["grad_norm"]) <= 0.05 * m32["grad_norm"]
    # Parameters are not compared leaf by leaf: in this untrained net the early layers' gradients
    # come from heavy cancellation (float32 itself is up to 6 % off float64 there, see
    # test_parity_torch), so bf16 moves the stem's update by about 40 % while the loss, the
    # gradient norm and the demo's final mAP (README) stay close.


def test_a_corrupt_checkpoint_falls_back_to_the_previous_one(tmp_path):
    run_train(
        tmp_path,
        "--config.total_steps=4",
        "--config.checkpoint_every_steps=2",
        "--config.eval_every_steps=4",
        "--config.keep_checkpoints=3",
    )
    latest = tmp_path / "checkpoints" / "latest"
    assert sorted(int(p.name) for p in latest.iterdir() if p.name.isdigit()) == [2, 4]
    for f in (latest / "4" / "state").rglob("*"):  # truncate every array file of step 4
        if f.is_file() and f.stat().st_size > 64 and "metadata" not in f.name:
            f.write_bytes(f.read_bytes()[:16])
    out = run_train(
        tmp_path,
        "--config.total_steps=6",
        "--config.checkpoint_every_steps=2",
        "--config.eval_every_steps=4",
        "--config.keep_checkpoints=3",
    )
    log = out.stdout + out.stderr
    assert "cannot restore checkpoint" in log and str(latest / "4") in log
    assert "resumed from step 2" in log
    rows = read_rows(tmp_path)
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5, 6]


def test_bad_host_allocator_setting_stops_train_py_in_one_line(tmp_path):
    env = {**os.environ, "CSCE_JAX_HOST_ALLOCATOR": "fast"}
    out = run_train(tmp_path / "w", check=False, env=env)
    assert out.returncode == 1
    assert out.stderr.strip() == (
        "error: CSCE_JAX_HOST_ALLOCATOR='fast': expected one of auto, tuned, default"
    )
    assert not (tmp_path / "w").exists()
