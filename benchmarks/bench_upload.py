"""One query image on the search page: the warm small encoder against the split encoder.

An index of 60 digit photographs is built with a run's checkpoint, the page is served from this
process, and the same photograph is uploaded ``--repeats`` times (HTTP round trip included);
beside it, the same image through the split encoder that indexing uses (its evaluation batch,
its decoding workers), as every upload went before.

  python benchmarks/bench_upload.py --workdir runs/demo [--repeats 8]

Last line: JSON; ``upload_ratio`` is the warm path's median time over the split encoder's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
from PIL import Image

from csce_jax.data.base import Source
from csce_jax.data.digits import digits_images
from csce_jax.search import build_index, queries, server


def _photos(folder: Path, n: int = 60) -> Path:
    images, labels = digits_images()
    for i in range(n):
        (folder / f"c{labels[i]}").mkdir(parents=True, exist_ok=True)
        picture = Image.fromarray(images[i]).convert("RGB").resize((96, 96))
        picture.save(folder / f"c{labels[i]}" / f"{i}.png")
    return folder


def _timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, help="a trained run folder")
    parser.add_argument("--repeats", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        photos = _photos(Path(tmp) / "photos")
        build_index(args.workdir, f"{tmp}/idx", images=str(photos))
        srv = server.SearchServer(queries.Searcher(f"{tmp}/idx"), "127.0.0.1", 0)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        data = next(photos.rglob("*.png")).read_bytes()

        def upload() -> None:
            req = urllib.request.Request(srv.url + "api/search?k=5", data=data, method="POST")
            with urllib.request.urlopen(req) as reply:
                assert reply.status == 200

        encoder = srv.searcher.encoder
        one = Source([data], np.zeros(1, np.int32), ["upload"], "query")
        warm = _timed(upload, args.repeats + 1)  # the first compiles the small encoder
        split = _timed(lambda: encoder._encoder.encode(encoder._weights, one), args.repeats + 1)
        srv.shutdown()
        srv.server_close()
    figures = {
        "first_upload_s": round(warm[0], 4),
        "upload_median_s": round(statistics.median(warm[1:]), 4),
        "split_encoder_median_s": round(statistics.median(split[1:]), 4),
    }
    figures["upload_ratio"] = round(
        figures["upload_median_s"] / figures["split_encoder_median_s"], 4
    )
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
