"""``csce-verify --config NAME|path.py [--out report.json]``: decode every image of a data
set once, up front, and report the unreadable ones (:mod:`csce_jax.data.verify`); exit 1 when
there are any."""

from __future__ import annotations

import os
from typing import Any

from absl import app, flags

from csce_jax.commands import cli
from csce_jax.data.datasets import load_data
from csce_jax.data.verify import check_sources, splits_of, write_report


def main(argv: list[str]) -> None:
    del argv
    cli.quiet_library_logs()
    config = flags.FLAGS.config
    out = os.path.abspath(flags.FLAGS.out or f"{config.data.name}_data_report.json")

    def run() -> dict[str, Any]:
        data = load_data(config.data)
        result = check_sources(
            splits_of(data), resize=config.data.resize, threads=config.data.num_workers
        )
        write_report(result, out)
        return result

    result = cli.error_boundary(run)
    print(f"checked {result['checked']} images, {len(result['bad'])} unreadable; report: {out}")
    if result["bad"]:
        for row in result["bad"][:20]:
            print(f"  {row['where']}: {row['error']}")
        raise SystemExit(1)


def run() -> None:
    """The command line (``csce-verify``)."""
    flags.DEFINE_string(
        "out", None, "report file (default: <data set>_data_report.json in the current folder)"
    )
    app.run(main, flags_parser=cli.flags_parser(config_required=True, module=__name__))


if __name__ == "__main__":
    run()
