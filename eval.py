"""Score a checkpoint: ``python eval.py --workdir runs/x [--config configs/x.py] [--step N]``.

Writes ``<workdir>/eval/metrics.json``, packed codes + labels + indices as ``.npy``,
``pr_curve.png`` and ``retrieval_grid.png``. ``--export_codes`` writes only the codes.
Codes made elsewhere (e.g. by the PyTorch release): ``--query_codes q.npy --db_codes d.npy
--query_labels ql.npy --db_labels dl.npy [--topk 1000]``.
"""

# Before any other import: glibc must be tuned before a second thread allocates (see hostmem).
from csce_jax import hostmem

hostmem.apply_environment()

import json  # noqa: E402
import sys  # noqa: E402

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from csce_jax import cli  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "config file; default: <workdir>/config.json", lock_config=True
)
flags.DEFINE_string("workdir", None, "the training run's folder")
flags.DEFINE_integer("step", None, "checkpoint step (default: the best)")
flags.DEFINE_string(
    "weights",
    None,
    "score this weights file (.safetensors/.npz/.pth, e.g. a "
    "converted PyTorch checkpoint) instead of a checkpoint; needs --config",
)
flags.DEFINE_string(
    "prepared", None, "read the images from this record set (python -m csce_jax.data.prepare)"
)
flags.DEFINE_bool("export_codes", False, "only encode and write the codes")
flags.DEFINE_integer("grid_queries", 5, "queries shown in retrieval_grid.png")
flags.DEFINE_string("query_codes", None, ".npy codes of the queries ({-1,+1} or packed)")
flags.DEFINE_string("db_codes", None, ".npy codes of the database")
flags.DEFINE_string("query_labels", None, ".npy labels of the queries")
flags.DEFINE_string("db_labels", None, ".npy labels of the database")
flags.DEFINE_integer("topk", -1, "mAP cut-off for --query_codes scoring (-1: whole database)")
flags.DEFINE_integer("bits", None, "code length when the .npy codes are packed")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.INFO)
    from csce_jax import eval_lib  # JAX loads here, after the flags (a quick --help)

    if FLAGS.query_codes:
        missing = [f for f in ("db_codes", "query_labels", "db_labels") if not getattr(FLAGS, f)]
        if missing:
            raise app.UsageError(f"--query_codes also needs --{', --'.join(missing)}")
        topk = None if FLAGS.topk < 0 else FLAGS.topk
        result = cli.error_boundary(
            eval_lib.score_npy,
            FLAGS.query_codes,
            FLAGS.db_codes,
            FLAGS.query_labels,
            FLAGS.db_labels,
            topk,
            FLAGS.bits,
        )
    else:
        if not FLAGS.workdir:
            raise app.UsageError("--workdir is required (or --query_codes ...)")
        if FLAGS.weights and FLAGS.config is None:
            raise app.UsageError("--weights needs --config (the architecture and data set)")
        cli.quiet_library_logs()
        config = cli.error_boundary(eval_lib.load_run_config, FLAGS.workdir, FLAGS.config)
        if FLAGS.prepared:
            config.unlock()
            config.data.prepared = FLAGS.prepared
        result = cli.error_boundary(
            eval_lib.run_eval,
            config,
            FLAGS.workdir,
            step=FLAGS.step,
            export_only=FLAGS.export_codes,
            grid_queries=FLAGS.grid_queries,
            weights_file=FLAGS.weights,
        )
    result.pop("pr_curve", None)
    print(json.dumps(result, indent=2, sort_keys=True))
    if "written_to" in result:
        print(f"wrote {result['written_to']}", file=sys.stderr)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
