"""Hash a collection and search it by image.

  python -m csce_jax.search index --workdir runs/x --images photos/ --out photos.idx.npz
  python -m csce_jax.search query --index photos.idx.npz query.jpg [-k 10] [--picture hits.png]

The index holds the packed codes and paths plus what they were made with: bits, the hash
centres' fingerprint, the run directory and checkpoint step. A query is encoded with that same
checkpoint; an index whose bits or centres do not match the checkpoint is refused. Unreadable
images are reported by name and left out of the index.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

INDEX_VERSION = 1


class IndexError_(ValueError):
    """An index file is unusable (missing, corrupt, or made with other codes)."""


def _image_files(folder: Path) -> list[str]:
    from csce_jax.data.sources import IMAGE_SUFFIXES

    if not folder.is_dir():
        raise IndexError_(f"image folder not found: {folder}")
    files = sorted(str(p) for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise IndexError_(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)})")
    return files


def _encoder(workdir: str, step: int | None):
    """(encode(paths) -> dict, meta) for the run's best (or ``step``) checkpoint."""
    from csce_jax import eval_lib
    from csce_jax.checkpointing import Checkpoints
    from csce_jax.data.sources import Source
    from csce_jax.sharding import make_mesh

    config = eval_lib.load_run_config(workdir, None)
    config.data.skip_corrupt = True
    ckpts = Checkpoints(workdir)
    found = ckpts.read_meta(step)
    ckpts.close()
    if found is None:
        raise IndexError_(f"no checkpoint in {Path(workdir) / 'checkpoints'}")
    got_step, meta = found
    graphdef, weights, got_step = eval_lib.restore_weights(
        config, workdir, meta["num_classes"], got_step
    )
    enc = eval_lib.Encoder(graphdef, config, make_mesh())

    def encode(paths: list[str]) -> dict[str, Any]:
        src = Source(paths, np.zeros(len(paths), np.int32), paths, "search")
        return enc.encode(weights, src)

    return encode, {
        "bits": config.bits,
        "centers": meta["centers"],
        "workdir": str(workdir),
        "step": got_step,
    }


def build_index(workdir: str, images: str, out: str, step: int | None = None) -> dict[str, Any]:
    """Encode every image under ``images`` and write the index ``out`` (.npz) atomically."""
    from csce_jax.metrics import pack_codes

    paths = _image_files(Path(images))
    encode, meta = _encoder(workdir, step)
    enc = encode(paths)
    for name in enc.get("skipped", []):
        print(f"skipped unreadable image: {name}", file=sys.stderr)
    kept = [paths[i] for i in enc["index"]]
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp.npz")
    np.savez(
        tmp,
        codes=pack_codes(enc["codes"]),
        paths=np.asarray(kept),
        meta=np.asarray(json.dumps({**meta, "version": INDEX_VERSION})),
    )
    os.replace(tmp, out)
    return {**meta, "indexed": len(kept), "skipped": len(enc.get("skipped", []))}


def load_index(path: str) -> tuple[np.ndarray, list[str], dict[str, Any]]:
    try:
        with np.load(path) as z:
            codes, paths, meta = z["codes"], list(z["paths"]), json.loads(str(z["meta"]))
    except FileNotFoundError:
        raise IndexError_(f"index not found: {path}") from None
    except Exception as e:
        raise IndexError_(f"{path} is not a csce_jax index: {e}") from None
    if meta.get("version") != INDEX_VERSION:
        raise IndexError_(f"{path}: index version {meta.get('version')}, expected {INDEX_VERSION}")
    return codes, paths, meta


def search(
    index: str, image: str, k: int = 10, picture: str | None = None
) -> list[tuple[str, int]]:
    """The ``k`` nearest indexed images to ``image``: [(path, Hamming distance)], ties by order."""
    from csce_jax.metrics import hamming_distances, pack_codes

    codes, paths, meta = load_index(index)
    encode, run = _encoder(meta["workdir"], meta["step"])
    if run["bits"] != meta["bits"] or run["centers"] != meta["centers"]:
        raise IndexError_(
            f"{index} was built with {meta['bits']}-bit codes under centres "
            f"{meta['centers']}, but {meta['workdir']} step {meta['step']} now gives "
            f"{run['bits']} bits under {run['centers']}: rebuild the index"
        )
    enc = encode([image])
    if enc.get("skipped"):
        raise IndexError_(f"cannot read the query image {image}")
    dist = hamming_distances(pack_codes(enc["codes"]), codes, bits=meta["bits"])[0]
    order = np.argsort(dist, kind="stable")[:k]
    hits = [(paths[i], int(dist[i])) for i in order]
    if picture:
        _picture([image] + [p for p, _ in hits], picture)
    return hits


def _picture(paths: list[str], out: str, cell: int = 128) -> None:
    from PIL import Image

    from csce_jax.data.images import load_rgb

    canvas = Image.new("RGB", (cell * len(paths) + 8, cell), "white")
    for i, p in enumerate(paths):
        img = load_rgb(p).resize((cell - 4, cell - 4))
        canvas.paste(img, (i * cell + (8 if i else 0) + 2, 2))
    canvas.save(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m csce_jax.search",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p_index = sub.add_parser("index", help="encode a folder of images")
    p_index.add_argument("--workdir", required=True, help="training run folder")
    p_index.add_argument("--config", help="ignored if given: the run's saved config is used")
    p_index.add_argument("--images", required=True)
    p_index.add_argument("--out", required=True, help="index file (.npz)")
    p_index.add_argument("--step", type=int, help="checkpoint step (default: the best)")
    p_query = sub.add_parser("query", help="search an index with an image")
    p_query.add_argument("--index", required=True)
    p_query.add_argument("image")
    p_query.add_argument("-k", type=int, default=10)
    p_query.add_argument("--picture", help="write the query and its hits as a PNG")
    args = parser.parse_args(argv)
    from csce_jax.train_lib import quiet_library_logs

    quiet_library_logs()
    from csce_jax.checkpointing import CheckpointError

    try:
        if args.command == "index":
            print(json.dumps(build_index(args.workdir, args.images, args.out, args.step)))
        else:
            for path, d in search(args.index, args.image, args.k, args.picture):
                print(f"{d:4d}  {path}")
    except (IndexError_, CheckpointError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
