"""``csce-search {index,query,serve}``: build, query and serve a search index over a run's
codes (:mod:`csce_jax.search`)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import ml_collections

from csce_jax.commands import cli
from csce_jax.config import apply_overrides, base_config, load_config_file
from csce_jax.errors import CodesError
from csce_jax.search import __doc__ as DOC
from csce_jax.search.engines import ENGINES

ENGINE_PARAMS = ("nlist", "nprobe", "M", "ef_construction", "ef_search")  # and --milvus_*


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="csce-search",
        description=DOC,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _index_arguments(sub.add_parser("index", help="encode a collection into an index folder"))
    q = sub.add_parser("query", help="search an index with one or many images")
    q.add_argument("--index", required=True)
    q.add_argument("image", nargs="*", help="query image file(s)")
    q.add_argument("--images", help="a folder of query images")
    q.add_argument("--list", dest="list_file", help="a file of query image paths, one a line")
    q.add_argument("-k", type=int, default=10, help="hits per query")
    q.add_argument("--label", help="only hits with this label (or among their classes)")
    q.add_argument("--out", help="write every query's hits to this .json or .csv")
    q.add_argument("--picture", help="one query: write it and its hits as a PNG")
    s = sub.add_parser("serve", help="a local search page over an index")
    s.add_argument("--index", required=True)
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument(
        "--token",
        help="every request must send 'Authorization: Bearer TOKEN' (needed on any --host but "
        "loopback; default $CSCE_SEARCH_TOKEN, which keeps it out of the process list)",
    )
    for sp in (q, s):
        sp.add_argument("--workdir", help="the run folder, if it moved since indexing")
        sp.add_argument(
            "--encoder",
            help="an exported ONNX encoder giving the index's codes (default: what built it)",
        )
        sp.add_argument("--config", help="config file[:args] (default: the run's config.json)")
    return parser


def _index_arguments(p: argparse.ArgumentParser) -> None:
    by = p.add_mutually_exclusive_group(required=True)
    by.add_argument("--workdir", help="training run folder")
    by.add_argument(
        "--encoder",
        help="an exported encoder (csce-convert export --format onnx) in place of a run",
    )
    p.add_argument("--config", help="config file[:args] (default: the run's config.json)")
    p.add_argument("--images", help="a folder of images (searched recursively)")
    p.add_argument("--list", dest="list_file", help="a DeepHash list file (path 0 1 0 ...)")
    p.add_argument("--image_root", help="with --list: the folder its paths are under")
    p.add_argument("--prepared", help="a record set (csce-prepare)")
    p.add_argument("--split", help="with --prepared: the split to index (e.g. database)")
    p.add_argument("--out", required=True, help="index folder")
    p.add_argument("--step", type=int, help="checkpoint step (default: the best)")
    p.add_argument("--engine", default="scan", choices=ENGINES)
    for name in ENGINE_PARAMS:
        p.add_argument(f"--{name}", type=int, help="engine parameter (default: see docs)")
    p.add_argument("--shard_size", type=int, help="images per shard (default 50,000)")
    p.add_argument(
        "--milvus_uri",
        help="--engine milvus: a Milvus Lite file (default: milvus.db in the index folder) or "
        "a server, http://host:19530",
    )
    p.add_argument("--milvus_collection", help="--engine milvus: the collection's name")
    p.add_argument("--milvus_index", choices=("bin_flat", "bin_ivf_flat"), help="default bin_flat")
    p.add_argument(
        "--milvus_token_env",
        help="--engine milvus: the environment variable holding the server's token "
        "(default MILVUS_TOKEN; the token is never written down)",
    )


def _index(args: argparse.Namespace, overrides: list[str]) -> dict:
    from csce_jax.runtime import startup
    from csce_jax.search.build import build_index

    given = load_config_file(args.config) if args.config else None
    # The job's multi-host settings come from this command line (--config.distributed=True:
    # one shard set per host), and JAX joins the job before the run is read.
    job = given if given is not None else base_config()
    apply_overrides(job, overrides)
    startup.initialize_distributed(job)
    if args.workdir:
        from csce_jax.runs.reader import run_config

        config = run_config(args.workdir, given)
    else:  # an exported encoder: the given config, a record set's own settings, or defaults
        config = given or _encoder_config(args)
    apply_overrides(config, overrides)
    params = {n: getattr(args, n) for n in ENGINE_PARAMS if getattr(args, n) is not None}
    given = {
        key: getattr(args, f"milvus_{key}")
        for key in ("uri", "collection", "index", "token_env")
        if getattr(args, f"milvus_{key}") is not None
    }
    return build_index(
        args.workdir,
        args.out,
        encoder=args.encoder,
        images=args.images,
        list_file=args.list_file,
        image_root=args.image_root,
        prepared=args.prepared,
        split=args.split,
        step=args.step,
        config=config,
        engine=args.engine,
        engine_params=params,
        milvus_settings=given or None,
        **({"shard_size": args.shard_size} if args.shard_size is not None else {}),
    )


def _encoder_config(args: argparse.Namespace) -> ml_collections.ConfigDict:
    """The config of an index built with an exported encoder and no --config."""
    from csce_jax.search.build import records_config
    from csce_jax.search.onnx_encoder import open_session

    if not args.prepared:
        return base_config()
    _, meta = open_session(Path(args.encoder))
    return records_config(args.prepared, int(meta["resize"]))


def _print_table(result: dict) -> None:
    many = len(result["queries"]) > 1
    print(("query\t" if many else "") + "rank\tdistance\tlabel\tpath")
    for q in result["queries"]:
        for h in q["hits"]:
            lead = f"{q['query']}\t" if many else ""
            print(f"{lead}{h['rank']}\t{h['distance']}\t{h['label'] or '-'}\t{h['path']}")


def _query(args: argparse.Namespace) -> None:
    from csce_jax.search import collection, queries

    config = load_config_file(args.config) if args.config else None
    paths = collection.query_paths(args.image, args.images, args.list_file)
    if args.picture and len(paths) != 1:
        raise CodesError("--picture draws one query: give a single image")
    with queries.Searcher(
        args.index, workdir=args.workdir, encoder=args.encoder, config=config
    ) as searcher:
        result = searcher.query_files(paths, args.k, label=args.label)
    for name in result["skipped"]:
        print(f"skipped unreadable query image: {name}", file=sys.stderr)
    if not result["queries"]:
        raise CodesError("no query image could be read")
    if args.picture:
        queries.draw_hits(result["queries"][0], args.picture)
        print(f"wrote {args.picture}", file=sys.stderr)
    if args.out:
        queries.write_hits(result, args.out)
        print(f"wrote the hits of {len(result['queries'])} queries to {args.out}", file=sys.stderr)
    else:
        _print_table(result)


def _serve(args: argparse.Namespace) -> None:
    from csce_jax.search import queries, server

    config = load_config_file(args.config) if args.config else None
    token = args.token if args.token is not None else os.environ.get(server.TOKEN_ENV)
    server.check_token(args.host, token)  # before the index and the model are loaded
    with queries.Searcher(
        args.index, workdir=args.workdir, encoder=args.encoder, config=config
    ) as searcher:
        server.serve(searcher, args.host, args.port, token)


def main(argv: list[str] | None = None) -> None:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "index":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    cli.quiet_library_logs()
    if args.command == "index":
        print(json.dumps(cli.error_boundary(_index, args, extra)))
    elif args.command == "query":
        cli.error_boundary(_query, args)
    else:
        cli.error_boundary(_serve, args)


if __name__ == "__main__":
    main()
