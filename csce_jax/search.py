"""Hash a collection and search it by image.

  python -m csce_jax.search index --workdir runs/x --images photos/ --out photos.idx.npz
  python -m csce_jax.search index --workdir runs/x --prepared records/ --split database --out db.idx.npz
  python -m csce_jax.search query --index photos.idx.npz query.jpg [-k 10] [--picture hits.png]

The index holds the packed codes and the images' absolute paths plus what they were made with:
bits, the hash centres' fingerprint, the run folder (absolute) and checkpoint step, so it works
from any folder. A query is encoded with that same checkpoint (``--workdir`` if the run has
moved; ``--config`` to use another config file than the run's ``config.json``). An index whose
bits or centres do not match the checkpoint, or whose arrays do not fit together, is refused.
Unreadable images are reported by name and left out of the index. The run's checkpoints are
only read, never written.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np

from csce_jax import cli, eval_lib, state
from csce_jax.data import load_data
from csce_jax.data.sources import IMAGE_SUFFIXES, Source
from csce_jax.encoding import Encoder
from csce_jax.errors import CodesError
from csce_jax.metrics import hamming_distances, pack_codes
from csce_jax.sharding import make_mesh
from csce_jax.viz import hits_strip

INDEX_VERSION = 2
IndexError_ = CodesError  # the error an unusable index raises


def _image_files(folder: Path) -> list[str]:
    if not folder.is_dir():
        raise CodesError(f"image folder not found: {folder}")
    files = sorted(
        str(p.absolute())
        for p in folder.rglob("*")
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES
    )
    if not files:
        raise CodesError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)})")
    return files


def _encoder(workdir: str, step: int | None, config: ml_collections.ConfigDict | None = None):
    """(encode(paths) -> dict, meta) for the run's best (or ``step``) checkpoint."""
    config = eval_lib.load_run_config(workdir, config)
    config.data.skip_corrupt = True
    num_classes = state.run_num_classes(workdir)
    mesh = make_mesh()
    graphdef, weights, got_step = state.restore_weights(
        config, workdir, num_classes, step, mesh=mesh
    )
    enc = Encoder(graphdef, config, mesh)
    pair = (weights["params"], weights["rest"])

    def encode(src: list[str] | Source) -> dict[str, Any]:
        if not isinstance(src, Source):
            src = Source(src, np.zeros(len(src), np.int32), src, "search")
        return enc.encode(pair, src)

    return encode, {
        "bits": config.bits,
        "centers": state.config_fingerprint(config, num_classes),
        "workdir": str(Path(workdir).absolute()),
        "step": got_step,
    }


def build_index(
    workdir: str,
    images: str,
    out: str,
    step: int | None = None,
    config: ml_collections.ConfigDict | None = None,
    prepared: str | None = None,
) -> dict[str, Any]:
    """Encode every image under ``images`` and write the index ``out`` (.npz) atomically.

    With ``prepared`` (a record set of ``csce_jax.data.prepare``), ``images`` is instead the
    name of one of its splits (train, val, database, query): its records are encoded, named by
    their source paths, without decoding a file."""
    config = eval_lib.load_run_config(workdir, config)
    if prepared:
        config.data.prepared = prepared
        data = load_data(config.data)
        if images not in ("train", "val", "database", "query") or getattr(data, images) is None:
            raise CodesError(f"--split={images!r}: not a split of the record set {prepared}")
        src = getattr(data, images)
        paths = list(src.where)
    else:
        paths = src = _image_files(Path(images))
    encode, meta = _encoder(workdir, step, config)
    enc = encode(src)
    for name in enc.get("skipped", []):
        print(f"skipped unreadable image: {name}", file=sys.stderr)
    kept = [paths[i] for i in enc["index"]]
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp.npz")
    try:
        np.savez(
            tmp,
            codes=pack_codes(enc["codes"]),
            paths=np.asarray(kept),
            meta=np.asarray(json.dumps({**meta, "version": INDEX_VERSION})),
        )
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return {**meta, "indexed": len(kept), "skipped": len(enc.get("skipped", []))}


def load_index(path: str) -> tuple[np.ndarray, list[str], dict[str, Any]]:
    """(packed codes, paths, meta) of an index, checked for consistency."""
    try:
        with np.load(path, allow_pickle=False) as z:
            codes, paths, meta = (
                z["codes"],
                [str(p) for p in z["paths"]],
                json.loads(str(z["meta"])),
            )
    except FileNotFoundError:
        raise CodesError(f"index not found: {path}") from None
    except Exception as e:
        raise CodesError(f"{path} is not a csce_jax index: {e}") from None
    if meta.get("version") != INDEX_VERSION:
        raise CodesError(f"{path}: index version {meta.get('version')}, expected {INDEX_VERSION}")
    bits = meta.get("bits")
    if not isinstance(bits, int) or bits < 1:
        raise CodesError(f"{path}: bad code length {bits!r} in its record")
    if codes.dtype != np.uint8 or codes.ndim != 2 or codes.shape[1] != -(-bits // 8):
        raise CodesError(
            f"{path}: codes of shape {codes.shape} and dtype {codes.dtype} do not hold "
            f"{bits}-bit codes packed into uint8 ({-(-bits // 8)} bytes each)"
        )
    if len(paths) != len(codes):
        raise CodesError(f"{path}: {len(codes)} codes but {len(paths)} paths")
    return codes, paths, meta


def search(
    index: str,
    image: str,
    k: int = 10,
    picture: str | None = None,
    *,
    workdir: str | None = None,
    config: ml_collections.ConfigDict | None = None,
) -> list[tuple[str, int]]:
    """The ``k`` nearest indexed images to ``image``: [(path, Hamming distance)], ties by order."""
    if k < 1:
        raise CodesError(f"-k {k}: the number of hits must be at least 1")
    codes, paths, meta = load_index(index)
    encode, run = _encoder(workdir or meta["workdir"], meta["step"], config)
    if run["bits"] != meta["bits"] or run["centers"] != meta["centers"]:
        raise CodesError(
            f"{index} was built with {meta['bits']}-bit codes under centres "
            f"{meta['centers']}, but {run['workdir']} step {meta['step']} now gives "
            f"{run['bits']} bits under {run['centers']}: rebuild the index"
        )
    enc = encode([str(Path(image).absolute())])
    if enc.get("skipped"):
        raise CodesError(f"cannot read the query image {image}")
    dist = hamming_distances(pack_codes(enc["codes"]), codes, bits=meta["bits"])[0]
    order = np.argsort(dist, kind="stable")[:k]
    hits = [(paths[i], int(dist[i])) for i in order]
    if picture:
        hits_strip([image] + [p for p, _ in hits], picture)
    return hits


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m csce_jax.search",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p_index = sub.add_parser("index", help="encode a folder of images")
    p_index.add_argument("--workdir", required=True, help="training run folder")
    p_index.add_argument("--config", help="config file[:args] (default: the run's config.json)")
    source = p_index.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", help="a folder of images (searched recursively)")
    source.add_argument(
        "--split", help="with --prepared: the record set's split to index (e.g. database)"
    )
    p_index.add_argument("--prepared", help="a record set (python -m csce_jax.data.prepare)")
    p_index.add_argument("--out", required=True, help="index file (.npz)")
    p_index.add_argument("--step", type=int, help="checkpoint step (default: the best)")
    p_query = sub.add_parser("query", help="search an index with an image")
    p_query.add_argument("--index", required=True)
    p_query.add_argument("image")
    p_query.add_argument("-k", type=int, default=10)
    p_query.add_argument("--picture", help="write the query and its hits as a PNG")
    p_query.add_argument("--workdir", help="the run folder, if it moved since indexing")
    p_query.add_argument("--config", help="config file[:args] (default: the run's config.json)")
    args = parser.parse_args(argv)
    cli.quiet_library_logs()
    config = cli.error_boundary(cli.load_config_file, args.config) if args.config else None
    if args.command == "index":
        if bool(args.split) != bool(args.prepared):
            parser.error("--split and --prepared go together (--images for a folder)")
        summary = cli.error_boundary(
            build_index,
            args.workdir,
            args.images or args.split,
            args.out,
            args.step,
            config,
            prepared=args.prepared,
        )
        print(json.dumps(summary))
    else:
        hits = cli.error_boundary(
            search,
            args.index,
            args.image,
            args.k,
            args.picture,
            workdir=args.workdir,
            config=config,
        )
        for path, d in hits:
            print(f"{d:4d}  {path}")


if __name__ == "__main__":
    main()
