"""``csce-splits --dataset NAME --out DIR``: write a data set's DeepHash split lists
(``train.txt``, ``database.txt``, ``test.txt``, ``val.txt``) and print each file's count and
SHA-256 (:mod:`csce_jax.data.splits`)."""

from __future__ import annotations

from absl import app, flags

from csce_jax.commands import cli
from csce_jax.config import data_config
from csce_jax.data.datasets import DATASETS
from csce_jax.data.splits import write_lists


def main(argv):
    del argv
    cli.quiet_library_logs()
    cfg = data_config(FLAGS.dataset)
    for key in ("data_dir", "manual_dir", "list_dir", "image_root"):
        if getattr(FLAGS, key):
            setattr(cfg, key, getattr(FLAGS, key))
    cfg.allow_size_mismatch = FLAGS.allow_size_mismatch
    for fname, (count, digest) in cli.error_boundary(write_lists, cfg, FLAGS.out).items():
        print(f"{fname:14s} {count:8d}  sha256 {digest}")


FLAGS = flags.FLAGS


def run() -> None:
    """The command line (``csce-splits``)."""
    flags.DEFINE_enum("dataset", "digits", sorted(DATASETS), "data set name")
    flags.DEFINE_string("out", None, "output folder", required=True)
    flags.DEFINE_string("data_dir", "", "tfds data_dir")
    flags.DEFINE_string("manual_dir", "", "manual directory (aircraft, nabirds, vegfru)")
    flags.DEFINE_string("list_dir", "", "folder with the DeepHash list files")
    flags.DEFINE_string("image_root", "", "image root for list files or an image folder")
    flags.DEFINE_bool("allow_size_mismatch", False, "accept split sizes that differ")
    app.run(
        main,
        flags_parser=cli.flags_parser(config_required=False, with_config=False, module=__name__),
    )


if __name__ == "__main__":
    run()
