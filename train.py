"""Train CSCE-Net: ``python train.py --config configs/<dataset>.py --workdir runs/x``.

Overrides: ``--config.bits=48 --config.total_steps=100``; config arguments:
``--config configs/cub200.py:bits=48``. Rerunning the same command resumes from the latest
checkpoint in the workdir. Exit status: 0 finished, 1 an error (one ``error:`` line),
``config.preempted_exit_code`` (75) stopped by SIGTERM/SIGINT after saving a checkpoint.
"""

# Before any other import: glibc must be tuned before a second thread allocates (see hostmem).
from csce_jax import hostmem

hostmem.apply_environment()

from csce_jax import preemption  # noqa: E402

preemption.install_early()  # a Ctrl-C or SIGTERM while the libraries load is not lost

import json  # noqa: E402

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from csce_jax import cli  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "config file (configs/*.py[:args])", lock_config=True
)
flags.DEFINE_string("workdir", None, "output folder (checkpoints, metrics.jsonl)", required=True)
flags.mark_flags_as_required(["config"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.INFO)
    cli.quiet_library_logs()
    from csce_jax import train_lib  # JAX loads here, after the flags (a quick --help)

    final = cli.error_boundary(train_lib.train_and_evaluate, FLAGS.config, FLAGS.workdir)
    print(json.dumps(final, sort_keys=True))
    if final.get("preempted"):
        raise SystemExit(FLAGS.config.preempted_exit_code)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
