"""Planning a run ahead of time (csce-plan): target names, the compiled programs' figures
against independent ones (the abstract state's bytes, our analytic FLOP count), the batch
search, and the demo model compiled for a TPU slice and a multi-host TPU topology."""

import json
import math

import jax
import numpy as np
import pytest
from conftest import run_module, tiny_config

from csce_jax.errors import ConfigError
from csce_jax.planning import plan, targets
from csce_jax.runtime import chips, startup

targets.libtpu_without_a_tpu(["v5e:2x2"])  # quiet, and shared by the suite's two workers

needs_libtpu = pytest.mark.skipif(
    not targets.libtpu_present(), reason='libtpu absent (pip install "jax[tpu]")'
)


def _request(config, per_device=2, per_device_eval=4):
    classes, multilabel = plan.data_shape(config)
    return plan.Request(per_device, per_device_eval, classes, multilabel)


def test_cloud_tpu_slice_names_map_to_their_topologies():
    assert targets._slice_topology("v5e", 8) == ("v5e:2x4", (2, 4, 1))  # one VM of 8 chips
    assert targets._slice_topology("v5e", 256) == ("v5e:16x16", (2, 2, 1))
    assert targets._slice_topology("v6e", 4) == ("v6e:2x2", (2, 2, 1))
    assert targets._slice_topology("v4", 8) == ("v4:2x2x1", (2, 2, 1))  # 8 cores = 4 chips
    assert targets._slice_topology("v5p", 128) == ("v5p:4x4x4", (2, 2, 1))
    assert targets._slice_topology("v5p", 2048) == ("v5p:8x8x16", (2, 2, 1))
    assert targets._slice_topology("v4", 16) == ("v4:2x2x2", (2, 2, 1))
    assert targets._slice_topology("v4", 64) == ("v4:2x4x4", (2, 2, 1))
    with pytest.raises(ConfigError, match="give the topology"):
        targets._slice_topology("v5p", 96)


def test_bad_and_gpu_targets_are_refused_in_one_line():
    with pytest.raises(ConfigError, match="not a target") as bad:
        targets.resolve("tpu-9000")
    assert "\n" not in str(bad.value)
    with pytest.raises(ConfigError, match="cannot compile for a GPU here") as gpu:
        targets.resolve("h100:8")  # the CUDA plugin needs a driver before it has a topology
    assert "\n" not in str(gpu.value) and "--target local" in str(gpu.value)
    with pytest.raises(ConfigError, match="this process has 4 CPU device"):
        targets.resolve("cpu:64")


def test_chips_are_told_apart_by_their_exact_device_kind():
    assert chips.chip_of("TPU v5").name == "v5p"  # not v5e's "TPU v5 lite"
    assert chips.chip_of("TPU v5 lite").name == "v5e"
    assert chips.chip_of("TPU v6 lite").name == "v6e"
    assert chips.chip_of("NVIDIA H100 80GB HBM3").name == "H100"
    assert chips.chip_of("cpu") is None


def test_collectives_are_read_from_the_program_text():
    hlo = "\n".join(
        [
            "  %all-reduce = f32[4]{0:T(128)S(1)} all-reduce(%x), channel_id=1",
            "  %all-reduce.1 = (f32[2,3]{1,0}, bf16[8]{0}) all-reduce(%a, %b), channel_id=2",
            "  %ag = (s8[4,16]{1,0}, s8[16,16]{1,0}) all-gather-start(%c), dimensions={0}",
            "  %agd = s8[16,16]{1,0} all-gather-done(%ag)",
            "  %conv = bf16[8,7,7,64]{3,2,1,0} convolution(%p, %w), window={size=3x3}, "
            'metadata={op_name="jit(step_fn)/conv_general_dilated"}',
            '  %dot = f32[16,10]{0,1} convolution(%v, %c), metadata={op_name="x/dot_general"}',
        ]
    )
    assert plan.collectives(hlo) == {
        "all-reduce": {"count": 2, "bytes": 16 + 24 + 16},
        "all-gather": {"count": 1, "bytes": 256},
    }
    assert plan.convolution_dtypes(hlo) == {"bf16": 1}


def test_the_step_bound_is_the_slower_of_compute_and_memory():
    v5e = chips.chip_named("v5e")
    bound = plan.step_bound(197e12, 819e9 * 2, v5e, "bfloat16")
    assert bound["compute_bound_s"] == pytest.approx(1.0)
    assert bound["memory_bound_s"] == pytest.approx(2.0)
    assert bound["bound_s"] == pytest.approx(2.0)
    assert plan.step_bound(1e9, 1e9, None, "float32")["bound_s"] is None


def test_the_batch_search_finds_the_largest_fitting_batch_in_few_compiles(monkeypatch):
    """Memory that grows linearly (with a step every 8 images, as tiled layouts do), flattens
    near the device's memory and is refused past it, as XLA:TPU does: the search must land
    on the exact largest batch, measuring each candidate by 'compiling'."""
    compiled = []

    def memory(b):
        return int(1.5 * 2**30 + math.ceil(b / 8) * 8 * 40 * 2**20)

    def fake_compile(config, target, request):
        b = request.per_device_batch
        compiled.append(b)
        if memory(b) > 16 * 2**30:  # XLA:TPU refuses a program past the device's memory
            return {"compile_error": "RESOURCE_EXHAUSTED: ...", "total_bytes": memory(b)}
        return {"total_bytes": min(memory(b), int(0.89 * 16 * 2**30))}  # and flattens near it

    monkeypatch.setattr(plan, "compile_train", fake_compile)
    target = targets.resolve("cpu:4")
    target = targets.Target("fake", "tpu", target.devices, "fake", chips.chip_named("v5e"))
    c = tiny_config()
    found = plan.fit_batch(c, target, _request(c, per_device=16))
    largest = max(b for b in range(1, 4096) if memory(b) <= 16 * 2**30)
    assert found["largest_per_device_batch"] == largest
    assert found["compiles"] == len(compiled) <= 16, found["measured"]


def test_a_cpu_target_reports_exact_arguments_and_flops_near_the_analytic_count():
    c = tiny_config()
    request = _request(c)
    report = plan.plan_target(c, targets.resolve("cpu:4"), request)
    train, enc = report["train"], report["encode"]
    crop = c.data.crop
    batch_bytes = request.per_device_batch * (crop * crop * 3 + 1 + 4)  # image, flip, label
    # Parameters, statistics, optimiser state and step are replicated: each device holds all.
    assert train["argument_bytes"] == train["state_bytes"] + batch_bytes
    assert train["alias_bytes"] == train["state_bytes"]  # the donated state is updated in place
    assert train["flops_xla_over_analytic"] == pytest.approx(1.0, abs=0.1)
    assert enc["flops_xla_over_analytic"] == pytest.approx(1.0, abs=0.15)
    grads = train["collectives"]["all-reduce"]["bytes"]
    assert grads >= 4 * sum(x.size for x in jax.tree.leaves(_params(c)))  # every gradient
    assert "all-gather" in enc["collectives"]  # codes and indices for every host
    assert report["kernels"] == "cpu" and report["fits"]
    assert report["global_batch"] == 8 and report["hosts"] == 1


def _params(config):
    from flax import nnx

    from csce_jax.runs import builders

    model = nnx.eval_shape(lambda: builders.create_model(config, 10))
    return nnx.state(model, nnx.Param)


@needs_libtpu
def test_the_demo_compiles_for_a_tpu_slice_with_xla_layers_and_bf16_convolutions():
    c = tiny_config()
    c.model.dtype = "bfloat16"
    request = _request(c, per_device=16, per_device_eval=16)
    target = targets.resolve("v5e:2x2")
    report = plan.plan_target(c, target, request)
    train, enc = report["train"], report["encode"]
    assert (report["platform"], report["chip"], report["devices"]) == ("tpu", "v5e", 4)
    assert report["kernels"] == "xla"  # "auto" never gives a TPU the CPU-tuned layers
    assert report["fits"] and train["total_bytes"] < 0.1 * 16 * 2**30
    # Independent figures: the abstract state's bytes (TPU layouts pad small arrays) and the
    # analytic FLOP count of the same network.
    batch_bytes = 16 * (c.data.crop**2 * 3 + 1 + 4)
    assert train["state_bytes"] + batch_bytes <= train["argument_bytes"]
    assert train["argument_bytes"] <= 4 * (train["state_bytes"] + batch_bytes)
    assert train["flops_xla_over_analytic"] == pytest.approx(1.0, abs=0.1)
    # XLA also counts the elementwise work our count leaves out, a larger share of a narrow
    # model's forward pass than of ResNet-50's.
    assert enc["flops_xla_over_analytic"] == pytest.approx(1.0, abs=0.15)
    assert set(train["convolutions"]) == {"bf16"}  # every convolution computes in bfloat16
    assert set(enc["convolutions"]) == {"bf16"}
    assert "all-reduce" in train["collectives"] and "all-gather" in enc["collectives"]
    assert train["checkpoint_layout_is_step_layout"]
    assert train["bound_s"] > 0 and train["images_per_s_per_device_bound"] > 0


@needs_libtpu
@pytest.mark.slow
def test_the_demo_compiles_for_a_multi_host_topology():
    """v5e:4x4 is 16 chips on 4 hosts of 4: each host feeds a quarter of the global batch, and
    a device does the same work as on one host (data parallel)."""
    c = tiny_config()
    request = _request(c, per_device=16, per_device_eval=4)
    target = targets.resolve("v5e:4x4")
    assert (target.hosts, target.devices_per_host) == (4, 4)
    report = plan.plan_target(c, target, request)
    assert report["global_batch"] == 256 and report["host_batch"] == 64
    assert report["train"]["flops_xla_over_analytic"] == pytest.approx(1.0, abs=0.1)
    assert "all-gather" in report["encode"]["collectives"]
    grads = report["train"]["collectives"]["all-reduce"]["bytes"]
    assert grads >= 4 * sum(x.size for x in jax.tree.leaves(_params(c)))


def test_the_command_plans_cpu_devices_and_ends_with_json(tmp_path):
    out = run_module(
        "-m",
        "csce_jax.commands.plan",
        "--config",
        "configs/default.py",
        "--config.model.width=0.0625",
        "--target",
        "cpu:2",
        "--per_device_batch",
        "2",
        "--per_device_eval_batch",
        "2",
        "--out",
        str(tmp_path / "plan.json"),
    )
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    (report,) = summary["targets"]
    assert report["target"] == "cpu:2" and report["devices"] == 2 and report["fits"]
    assert "FLOPs/device/step" in out.stdout
    assert json.loads((tmp_path / "plan.json").read_text()) == summary


def test_the_command_help_lists_its_own_flags_and_exits_0():
    out = run_module("-m", "csce_jax.commands.plan", "--help")
    assert out.returncode == 0, out.stderr[-2000:]
    for flag in ("--target", "--fit", "--per_device_batch", "--margin", "--num_classes"):
        assert flag in out.stdout


def test_the_command_refuses_a_gpu_target_in_one_line():
    out = run_module("-m", "csce_jax.commands.plan", "--config", "default", "--target", "a100:8")
    assert out.returncode == 1
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: --target a100:8: {targets.GPU_REFUSAL}"], out.stderr[-2000:]


def test_a_tpu_vm_job_joins_with_no_arguments(monkeypatch):
    """On a TPU VM slice every host runs the same command with config.distributed=True;
    JAX finds the coordinator and the process ids itself."""
    calls = []
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    monkeypatch.setattr(startup, "accelerator_present", lambda: True)
    c = tiny_config()
    c.distributed = True
    startup.initialize_distributed(c)
    assert calls == [
        {
            "initialization_timeout": startup.JOIN_TIMEOUT_S,
            "heartbeat_timeout_seconds": startup.HEARTBEAT_TIMEOUT_S,
        }
    ]


def test_data_sets_give_their_class_count_and_lists_need_one():
    c = tiny_config()
    assert plan.data_shape(c) == (10, False)
    c.data.name = "coco"
    assert plan.data_shape(c) == (80, True)
    c.data.name = "lists"
    with pytest.raises(ConfigError, match="--num_classes"):
        plan.data_shape(c)
    assert plan.data_shape(c, 37) == (37, False)
    assert np.isfinite(plan.DEFAULT_MARGIN)


@needs_libtpu
def test_ctrl_c_during_a_long_fit_stops_at_once_and_writes_nothing(tmp_path):
    """SIGINT while ``--fit`` compiles the demo for a TPU slice (about a minute a compile
    here): exit 130 within seconds, the --out file of an earlier plan untouched, no
    temporary file left."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from conftest import ROOT

    out = tmp_path / "plan.json"
    out.write_text('{"earlier": true}')
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "csce_jax.commands.plan", "--config", "configs/default.py"),
            *("--target", "v5e:2x2", "--fit", "--out", str(out)),
        ],
        cwd=ROOT,
        env={k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"},
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    try:
        log = []
        for line in proc.stderr:  # until the first compile is under way
            log.append(line)
            if "compiling" in line:
                break
        assert proc.poll() is None, "".join(log)
        time.sleep(3)
        proc.send_signal(signal.SIGINT)
        began = time.monotonic()
        rest = proc.communicate(timeout=60)[1]
        took = time.monotonic() - began
    finally:
        proc.kill()
    assert proc.returncode == 130, rest[-2000:]
    assert took < 10, took
    assert "error: interrupted" in rest and "Traceback" not in rest
    assert out.read_text() == '{"earlier": true}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.json"]
