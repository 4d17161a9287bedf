"""``csce-train --config NAME|path.py[:args] --workdir runs/x [--config.key=value ...]``.

Any config field is set with ``--config.a.b=value`` (``--config.optimizer.lr=1e-4``); every
field, its default and its allowed values: ``python -m csce_jax.config``. Config arguments go
after ``:`` (``--config cub200:bits=48``). Rerunning the same command resumes from the latest
checkpoint in the workdir; where no checkpoint there can be read the run stops, and
``--start_over`` (set them all aside, train from step 0) is the explicit way to begin again.
Exit status: 0 finished, 1 an error (one ``error:`` line), 2 a bad command line,
``config.preempted_exit_code`` (75) stopped by SIGTERM/SIGINT after saving a checkpoint.
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags, logging

from csce_jax.commands import cli
from csce_jax.runtime import hostmem

FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.INFO)
    cli.quiet_library_logs()
    from csce_jax.train import first_compile, loop  # JAX loads here, after the flags

    final = cli.error_boundary(
        loop.train_and_evaluate, FLAGS.config, FLAGS.workdir, start_over=FLAGS.start_over
    )
    print(json.dumps(final, sort_keys=True))
    if final.get("preempted"):
        if first_compile.compile_in_flight():
            # Stopped during the first compile: XLA would abort at interpreter exit under the
            # still-running compilation, so leave now (logs and files are already flushed).
            logging.flush()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(FLAGS.config.preempted_exit_code)
        raise SystemExit(FLAGS.config.preempted_exit_code)


def run() -> None:
    """The command: allocator and early signals first, then the flags, then training."""
    hostmem.apply_environment()  # before any thread allocates (see hostmem)
    from csce_jax.train import preemption

    preemption.install_early()  # a Ctrl-C or SIGTERM while the libraries load is not lost
    flags.DEFINE_string(
        "workdir", None, "output folder (checkpoints, metrics.jsonl)", required=True
    )
    flags.DEFINE_boolean(
        "start_over",
        False,
        "train from step 0 in a workdir that holds checkpoints: every one is moved to "
        "corrupt_checkpoints/ (kept), none resumed; without it a run resumes, or stops when no "
        "checkpoint's record reads",
    )
    app.run(main, flags_parser=cli.flags_parser(config_required=True, module=__name__))


if __name__ == "__main__":
    run()
