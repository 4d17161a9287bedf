"""``csce-plan --config NAME|path.py[:args] --target v5e:2x2 [--target ...] [--fit]``: compile
a config's training and encoding steps ahead of time for TPU slices, N CPU devices or this
host's GPUs, with no weights and no data, and report per device what XLA would run there.

For each target: memory (arguments, temporaries, outputs, code) against the chip's, whether it
fits with the margin left free, FLOPs per step (XLA's and our analytic count), the step-time
lower bound from the chip's peak FLOP/s and bandwidth (so the best images/s per device), the
collectives per step, hosts and devices per host, and the compile time. ``--fit`` also finds
the largest per-device training batch that fits, by compiling. A table, then one JSON line.
TPU targets need libtpu (``pip install "jax[tpu]==<jax version>"``); docs/training.md.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from absl import app, flags, logging

from csce_jax.commands import cli

FLAGS = flags.FLAGS


def _define_flags() -> None:
    flags.DEFINE_multi_string(
        "target",
        None,
        "a TPU topology (v5e:2x2, v5p:4x4x4) or slice (v5e-8, v4-8, v5p-128, v6e-256), "
        "cpu:N, or local; repeat for several",
    )
    flags.DEFINE_integer(
        "per_device_batch", 0, "training images per device (0: config.batch_size spread)"
    )
    flags.DEFINE_integer(
        "per_device_eval_batch", 0, "encoding images per device (0: config.eval_batch_size spread)"
    )
    flags.DEFINE_integer("num_classes", 0, "classes (list files and folders; else the data set's)")
    flags.DEFINE_float("margin", 0.1, "share of each device's memory kept free")
    flags.DEFINE_bool("fit", False, "also find the largest per-device batch that fits")
    flags.DEFINE_bool("encode", True, "also compile the encoding step")
    flags.DEFINE_string("out", None, "also write the report (JSON) to this file")


def _spread(total: int, devices: int) -> int:
    return max(1, -(-total // devices))


def plan_all(config, names: list[str]) -> list[dict[str, Any]]:
    """The report of every target, in order (``--fit`` adds its search to each)."""
    from csce_jax.planning import plan, targets

    classes, multilabel = plan.data_shape(config, FLAGS.num_classes)
    reports = []
    for name in names:
        target = targets.resolve(name)
        devices = len(target.devices)
        request = plan.Request(
            per_device_batch=FLAGS.per_device_batch or _spread(config.batch_size, devices),
            per_device_eval_batch=FLAGS.per_device_eval_batch
            or _spread(config.eval_batch_size, devices),
            num_classes=classes,
            multilabel=multilabel,
            margin=FLAGS.margin,
        )
        logging.info("%s: %d %s device(s), compiling", name, devices, target.device_kind)
        report = plan.plan_target(config, target, request, encode=FLAGS.encode)
        if FLAGS.fit:
            train = report["train"]
            known = (
                {} if "compile_error" in train else {request.per_device_batch: train["total_bytes"]}
            )
            report["fit"] = plan.fit_batch(config, target, request, log=_log_fit, known=known)
        reports.append(report)
        print(format_report(report), flush=True)
    return reports


def _log_fit(batch: int, total: int, usable: float) -> None:
    verdict = "fits" if total <= usable else "does not fit"
    logging.info("--fit: %d per device: %.2f GiB needed, %s", batch, total / 2**30, verdict)


def _gib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**30:.2f} GiB"


def _num(x: float | None, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def format_report(r: dict[str, Any]) -> str:
    """One target's report as aligned lines for a terminal."""
    lines = [
        f"== {r['target']} ({r['topology']}): {r['devices']} x {r['device_kind']}, "
        f"{r['hosts']} host(s) x {r['devices_per_host']} device(s); {r['dtype']}, "
        f"kernels {r['kernels']}; batch {r['per_device_batch']}/device "
        f"(global {r['global_batch']}, {r['host_batch']} per host)",
        f"   memory per device {_gib(r['memory_per_device_bytes'])}, margin {r['margin']:.0%}: "
        + ("fits" if r["fits"] else "DOES NOT FIT"),
    ]
    for step in ("train", "encode"):
        if step not in r:
            continue
        s = r[step]
        if "compile_error" in s:
            lines.append(f"   {step:6} refused by the compiler: {s['compile_error']}")
            continue
        coll = ", ".join(
            f"{k} x{v['count']} ({_gib(v['bytes'])})" for k, v in s["collectives"].items()
        )
        lines += [
            f"   {step:6} total {_gib(s['total_bytes'])} (arguments {_gib(s['argument_bytes'])}, "
            f"temporaries {_gib(s['temp_bytes'])}, outputs {_gib(s['output_bytes'])}, "
            f"aliased {_gib(s['alias_bytes'])}, code {_gib(s['code_bytes'])})",
            f"          FLOPs/device/step XLA {_num(s['flops_xla'], '.3e')}, analytic "
            f"{_num(s['flops_analytic'], '.3e')}; bound {_num(s['bound_s'], '.4f')} s "
            f"(<= {_num(s['images_per_s_per_device_bound'], ',.0f')} images/s/device); "
            f"compiled in {s['compile_s']:.1f} s",
            f"          collectives: {coll or 'none'}",
        ]
    if "fit" in r:
        f = r["fit"]
        lines.append(
            f"   --fit: largest batch per device {f['largest_per_device_batch']} "
            f"({_gib(f['total_bytes'])} of {_gib(f['usable_bytes'])} usable; "
            f"{f['compiles']} compiles)"
        )
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not FLAGS.target:
        raise app.UsageError("--target is required (e.g. --target v5e:2x2)")
    if not 0 <= FLAGS.margin < 1:
        raise app.UsageError(f"--margin {FLAGS.margin}: must be in [0, 1)")
    logging.set_verbosity(logging.INFO)
    cli.quiet_library_logs()
    from csce_jax.planning import targets

    targets.libtpu_without_a_tpu(FLAGS.target)

    cpus = targets.cpu_devices_needed(FLAGS.target)
    if cpus and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        import jax

        jax.config.update("jax_num_cpu_devices", cpus)  # before the CPU backend starts
    # Ctrl-C stops within a moment, even inside a compile of minutes: nothing is written.
    reports = cli.error_boundary(cli.interruptible, plan_all, FLAGS.config, FLAGS.target)
    summary = {"config": cli.config_spec(sys.argv[1:])[0], "targets": reports}
    if FLAGS.out:
        from csce_jax.utils.atomic import write_json_atomically

        cli.error_boundary(write_json_atomically, FLAGS.out, summary)
    print(json.dumps(summary, sort_keys=True))


def run() -> None:
    """The command: the flags, then the plans."""
    _define_flags()
    app.run(main, flags_parser=cli.flags_parser(config_required=True, module=__name__))


if __name__ == "__main__":
    run()
