"""``csce-convert {torch-to-jax,jax-to-torch,export} --src A --dst B``: weights between the
release's PyTorch files and ours, or a run's checkpoint exported (:mod:`csce_jax.convert`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from csce_jax import convert as _convert
from csce_jax.commands import cli
from csce_jax.errors import ConversionError


def _run(direction: str, src: str, dst: str, image_size: int, step: int | None) -> str:
    if direction == "export":
        from csce_jax.api import export_run

        if not (Path(src) / "checkpoints").is_dir():
            raise ConversionError(
                f"--src {src}: not a training run (no checkpoints/ in it); export reads a run "
                "folder (for a weights file use torch-to-jax or jax-to-torch)"
            )
        _convert.check_distinct(src, dst)
        return export_run(src, dst, step)
    return _convert.convert_file(direction, src, dst, image_size, step=step)


def main(argv: list[str] | None = None) -> None:
    """The command line; ``argv`` defaults to ``sys.argv[1:]``."""
    parser = argparse.ArgumentParser(
        prog="csce-convert",
        description=_convert.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("direction", choices=["torch-to-jax", "jax-to-torch", "export"])
    parser.add_argument(
        "--src", required=True, help="input file (.pth/.pt/.safetensors/.npz); export: a run"
    )
    parser.add_argument("--step", type=int, help="export: the checkpoint step (default: best)")
    parser.add_argument(
        "--dst",
        required=True,
        help="output: .safetensors/.npz (torch-to-jax, export); .pt/.pth (torch.save, loads "
        "into the release's ResNet_DOLG) or .safetensors (jax-to-torch, export)",
    )
    parser.add_argument(
        "--image_size",
        type=int,
        default=224,
        help="input size the release model was trained at (sets the window count)",
    )
    args = parser.parse_args(argv)
    print(cli.error_boundary(_run, args.direction, args.src, args.dst, args.image_size, args.step))


if __name__ == "__main__":
    main()
