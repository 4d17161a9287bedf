"""``csce-eval --workdir runs/x [--config ...] [--step N]``: score a run's checkpoint.

Writes ``<workdir>/eval/metrics.json``, packed codes + labels + indices as ``.npy``,
``pr_curve.png`` and ``retrieval_grid.png``; ``--export_codes`` writes only the codes.
Codes made elsewhere (e.g. by the PyTorch release): ``--query_codes q.npy --db_codes d.npy
--query_labels ql.npy --db_labels dl.npy [--topk 1000]``.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging

from csce_jax.commands import cli
from csce_jax.runtime import hostmem
from csce_jax.utils.atomic import json_text

FLAGS = flags.FLAGS


def _define_flags() -> None:
    flags.DEFINE_string("workdir", None, "the training run's folder")
    flags.DEFINE_integer("step", None, "checkpoint step (default: the best)")
    flags.DEFINE_string(
        "weights",
        None,
        "score this weights file (.safetensors/.npz/.pth, e.g. a converted PyTorch "
        "checkpoint) instead of a checkpoint; needs --config",
    )
    flags.DEFINE_string("prepared", None, "read the images from this record set (csce-prepare)")
    flags.DEFINE_bool("export_codes", False, "only encode and write the codes")
    flags.DEFINE_integer("grid_queries", 5, "queries shown in retrieval_grid.png")
    flags.DEFINE_string("query_codes", None, ".npy codes of the queries ({-1,+1} or packed)")
    flags.DEFINE_string("db_codes", None, ".npy codes of the database")
    flags.DEFINE_string("query_labels", None, ".npy labels of the queries")
    flags.DEFINE_string("db_labels", None, ".npy labels of the database")
    flags.DEFINE_integer("topk", -1, "mAP cut-off for --query_codes scoring (-1: whole database)")
    flags.DEFINE_integer("bits", None, "code length when the .npy codes are packed")


def _score_npy(report) -> dict:
    missing = [f for f in ("db_codes", "query_labels", "db_labels") if not getattr(FLAGS, f)]
    if missing:
        raise app.UsageError(f"--query_codes also needs --{', --'.join(missing)}")
    topk = None if FLAGS.topk == -1 else FLAGS.topk  # any other value <= 0 is refused
    return cli.error_boundary(
        report.score_npy,
        FLAGS.query_codes,
        FLAGS.db_codes,
        FLAGS.query_labels,
        FLAGS.db_labels,
        topk,
        FLAGS.bits,
    )


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.INFO)
    cli.quiet_library_logs()  # before JAX starts: no TPU probe on a host without one
    from csce_jax.runs import report  # JAX loads here, after the flags (a quick --help)

    if FLAGS.query_codes:
        result = _score_npy(report)
    else:
        if not FLAGS.workdir:
            raise app.UsageError("--workdir is required (or --query_codes ...)")
        if FLAGS.weights and FLAGS.config is None:
            raise app.UsageError("--weights needs --config (the architecture and data set)")
        result = cli.error_boundary(
            report.run_eval,
            FLAGS.workdir,
            FLAGS.config,
            step=FLAGS.step,
            prepared=FLAGS.prepared,
            export_only=FLAGS.export_codes,
            grid_queries=FLAGS.grid_queries,
            weights_file=FLAGS.weights,
        )
    result.pop("pr_curve", None)
    print(json_text(result))
    if "written_to" in result:
        print(f"wrote {result['written_to']}", file=sys.stderr)


def run() -> None:
    """The command: the allocator first, then the flags, then the evaluation."""
    hostmem.apply_environment()  # before any thread allocates (see hostmem)
    _define_flags()
    app.run(main, flags_parser=cli.flags_parser(config_required=False, module=__name__))


if __name__ == "__main__":
    run()
