"""``csce-convert {torch-to-jax,jax-to-torch,export} --src A --dst B``: weights between the
release's PyTorch files and ours, a run's checkpoint exported, or (``export --format onnx|
stablehlo``) the encoder as a deployable artifact (:mod:`csce_jax.convert.artifact`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from csce_jax import convert as _convert
from csce_jax.commands import cli
from csce_jax.errors import ConversionError


def _export_artifact(fmt: str, src: str, dst: str, step: int | None, logits: bool) -> str:
    """A run folder, a converted .safetensors/.npz or a release .pt as ONNX or StableHLO."""
    from csce_jax.api import load_model
    from csce_jax.convert import artifact

    want = {"onnx": ".onnx", "stablehlo": ".stablehlo"}[fmt]
    if Path(dst).suffix.lower() != want:
        raise ConversionError(f"--dst {dst}: --format {fmt} writes a {want} file")
    if not Path(src).exists():
        raise ConversionError(f"--src {src}: no such run folder or weights file")
    _convert.check_distinct(src, dst)
    loaded = load_model(src, step)
    export = artifact.export_onnx if fmt == "onnx" else artifact.export_stablehlo
    meta = export(loaded, src, dst, logits=logits)
    where = f"step {loaded.step}" if loaded.step is not None else "weights"
    extra = f", platforms {','.join(meta['platforms'])}" if "platforms" in meta else ""
    return (
        f"exported {src} ({where}) -> {dst}: {fmt}, {meta['bits']} bits, input uint8 "
        f"N x {meta['crop']} x {meta['crop']} x 3{extra}; checked against the model"
    )


def _run(args: argparse.Namespace) -> str:
    direction, src, dst, step = args.direction, args.src, args.dst, args.step
    if direction == "export" and args.format != "weights":
        return _export_artifact(args.format, src, dst, step, args.logits)
    if direction == "export":
        from csce_jax.api import export_run

        if not (Path(src) / "checkpoints").is_dir():
            raise ConversionError(
                f"--src {src}: not a training run (no checkpoints/ in it); export reads a run "
                "folder (for a weights file use torch-to-jax or jax-to-torch)"
            )
        _convert.check_distinct(src, dst)
        return export_run(src, dst, step)
    return _convert.convert_file(direction, src, dst, args.image_size, step=step)


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
        "--format",
        choices=["weights", "onnx", "stablehlo"],
        default="weights",
        help="export: weights (default), or the encoder as an ONNX or serialized StableHLO "
        "file (--src: a run, a converted .safetensors or a release .pt); see docs/serving.md",
    )
    parser.add_argument("--logits", action="store_true", help="onnx/stablehlo: logits too")
    parser.add_argument(
        "--image_size",
        type=int,
        default=224,
        help="input size the release model was trained at (sets the window count)",
    )
    args = parser.parse_args(argv)
    cli.quiet_library_logs()
    if args.direction != "export" and (args.format != "weights" or args.logits):
        parser.error("--format and --logits go with export")
    print(cli.error_boundary(_run, args))


if __name__ == "__main__":
    main()
