"""``csce-compare --config NAME|path.py --workdir DIR [--steps N] [--gradients]``: train the
PyTorch reference of the release and our model side by side on the same batches
(:mod:`csce_jax.bridge.compare`), or judge one batch's gradients tensor by tensor
(:mod:`csce_jax.bridge.gradients`)."""

from __future__ import annotations

import json

from absl import app, flags, logging

from csce_jax.commands import cli


def main(argv: list[str]) -> None:
    del argv
    logging.set_verbosity(logging.INFO)
    cli.quiet_library_logs()
    from csce_jax.bridge.compare import compare

    f = flags.FLAGS
    if f.gradients:
        from csce_jax.bridge.gradients import compare_gradients

        summary = cli.error_boundary(
            compare_gradients, f.config, f.workdir, f.init, f.release_dir, f.points
        )
    else:
        summary = cli.error_boundary(
            compare, f.config, f.steps, f.workdir, f.init, f.release_dir, f.floor
        )
    print(json.dumps(summary, sort_keys=True))


def run() -> None:
    """The command line (``csce-compare``)."""
    flags.DEFINE_integer("steps", 50, "training steps on both sides")
    flags.DEFINE_string("workdir", None, "output folder (comparison.json, loss_curves.png)")
    flags.DEFINE_string(
        "init", "", "start from a release .pt/.pth, a converted file, or a run folder"
    )
    flags.DEFINE_string("release_dir", None, "a checkout of the release's code (torchvision)")
    flags.DEFINE_enum(
        "floor",
        "both",
        ["both", "float64", "nudged", "none"],
        "the rounding floor: PyTorch trained again in float64, and/or in float32 from weights "
        "one unit in the last place away (nudged); none: skip",
    )
    flags.DEFINE_boolean(
        "gradients",
        False,
        "judge one batch instead of a trajectory: every gradient tensor, one optimiser step, "
        "the batch statistics and outputs of ours and PyTorch float32 against PyTorch float64 "
        "(gradients.json, gradients.png; see csce_jax.bridge.gradients)",
    )
    flags.DEFINE_integer(
        "points",
        2,
        "with --gradients: 1, or 2 to repeat at the float64 side's step-1 weights on the next "
        "batch",
        lower_bound=1,
        upper_bound=2,
    )
    flags.mark_flags_as_required(["workdir"])
    app.run(main, flags_parser=cli.flags_parser(config_required=True, module=__name__))


if __name__ == "__main__":
    run()
