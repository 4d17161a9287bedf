"""``csce-prepare --config NAME|path.py --out DIR [--workers N --shard_size N --format raw|jpeg]``:
write a data set's decoded, resized images once as ArrayRecord shards
(:mod:`csce_jax.data.prepare`); train from them with ``--config.data.prepared=DIR``."""

from __future__ import annotations

import json
import os

from absl import app, flags, logging

from csce_jax.commands import cli
from csce_jax.data.prepare import prepare


def main(argv: list[str]) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)
    cli.quiet_library_logs()
    f = flags.FLAGS
    summary = cli.error_boundary(
        prepare,
        f.config,
        f.out,
        workers=f.workers,
        shard_size=f.shard_size,
        image_format=f.format,
        jpeg_quality=f.jpeg_quality,
    )
    print(json.dumps(summary, sort_keys=True))


def run() -> None:
    """The command line (``csce-prepare``)."""
    flags.DEFINE_string("out", None, "the record set's folder")
    flags.DEFINE_integer("workers", max(1, (os.cpu_count() or 2)), "writing processes")
    flags.DEFINE_integer("shard_size", 1024, "records per shard")
    flags.DEFINE_enum("format", "raw", ["raw", "jpeg"], "raw pixels or JPEG")
    flags.DEFINE_integer("jpeg_quality", 95, "with --format jpeg")
    flags.mark_flags_as_required(["out"])
    app.run(main, flags_parser=cli.flags_parser(config_required=True, module=__name__))


if __name__ == "__main__":
    run()
