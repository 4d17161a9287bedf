"""``search index``: encode a collection with a run's checkpoint into an index folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import ml_collections

from csce_jax.config import base_config
from csce_jax.data.records import read_manifest
from csce_jax.errors import CodesError
from csce_jax.search import collection, engines, milvus
from csce_jax.search.index import (
    DEFAULT_SHARD_SIZE,
    CodeEncoder,
    encode_shards,
    finish_index,
    insert_into_milvus,
)
from csce_jax.search.onnx_encoder import OnnxEncoder


def choose_collection(
    config: ml_collections.ConfigDict,
    *,
    images: str | None = None,
    list_file: str | None = None,
    image_root: str | None = None,
    prepared: str | None = None,
    split: str | None = None,
) -> collection.Collection:
    """The one collection the arguments name: a folder, a list file or a record set's split."""
    given = [x for x in (images, list_file, prepared) if x]
    if len(given) != 1:
        raise CodesError("give one of --images DIR, --list FILE or --prepared DIR --split NAME")
    if bool(prepared) != bool(split):
        raise CodesError("--split and --prepared go together (--images for a folder)")
    if image_root and not list_file:
        raise CodesError("--image_root goes with --list")
    if images:
        return collection.from_folder(images)
    if list_file:
        return collection.from_list(list_file, image_root)
    return collection.from_prepared(config, prepared, split)


def open_encoder(
    workdir: str | None,
    encoder: str | None,
    step: int | None,
    config: ml_collections.ConfigDict | None,
) -> CodeEncoder:
    """The run's checkpoint (on this host's devices), or the exported ONNX encoder."""
    if (workdir is None) == (encoder is None):
        raise CodesError("give one of --workdir RUN or --encoder FILE.onnx")
    if encoder is None:
        from csce_jax.search.encoder import RunEncoder  # the model code, for a run only

        return RunEncoder(workdir, step, config, local=True)
    if step is not None:
        raise CodesError("--step goes with --workdir: an exported encoder is one checkpoint")
    return OnnxEncoder(encoder)


def records_config(prepared: str, resize: int) -> ml_collections.ConfigDict:
    """A config whose data settings are the record set's own (an exported encoder has no
    run config), refused where its images were resized for another encoder."""
    settings = read_manifest(prepared)["settings"]
    if settings.get("resize") != resize:
        raise CodesError(
            f"--prepared {prepared} holds images resized to {settings.get('resize')}, but the "
            f"encoder takes images resized to {resize}: prepare it with data.resize={resize}"
        )
    config = base_config()
    for key, value in settings.items():
        if key in config.data:
            config.data[key] = value
    return config


def _encoder_and_collection(
    workdir: str | None,
    encoder: str | None,
    step: int | None,
    config: ml_collections.ConfigDict | None,
    **where: str | None,
) -> tuple[CodeEncoder, collection.Collection]:
    """The encoder and the collection to index; a run's checkpoint is loaded only once the
    collection's arguments are known to be right."""
    if workdir is not None and encoder is None:
        from csce_jax.runs.reader import run_config  # the training code, for a run only

        config = run_config(workdir, config)
        coll = choose_collection(config, **where)
        return open_encoder(workdir, None, step, config), coll
    enc = open_encoder(workdir, encoder, step, None)
    if config is None:
        prepared = where.get("prepared")
        config = records_config(prepared, enc.resize) if prepared else base_config()
    return enc, choose_collection(config, **where)


def build_index(
    workdir: str | None,
    out: str,
    *,
    encoder: str | None = None,
    images: str | None = None,
    list_file: str | None = None,
    image_root: str | None = None,
    prepared: str | None = None,
    split: str | None = None,
    step: int | None = None,
    config: ml_collections.ConfigDict | None = None,
    engine: str = "scan",
    engine_params: dict[str, int] | None = None,
    shard_size: int = DEFAULT_SHARD_SIZE,
    milvus_settings: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Encode a collection with ``workdir``'s best (or ``step``) checkpoint, or with the
    exported ONNX ``encoder``, into the index folder ``out``, resuming an interrupted build;
    returns a summary (process 0's is whole).

    ``milvus_settings`` (engine ``milvus``): the keyword arguments of
    :func:`csce_jax.search.milvus.settings` (uri, collection, index, token_env)."""
    engine_params = dict(engine_params or {})
    folder = Path(out)
    record = _milvus_settings(engine, engine_params, milvus_settings, folder)
    # A server is reached before anything is written (unreachable: one line, nothing made).
    store = milvus.Store(record, folder) if record and milvus.is_server(record["uri"]) else None
    try:
        where = {"images": images, "list_file": list_file, "image_root": image_root}
        where.update(prepared=prepared, split=split)
        enc, coll = _encoder_and_collection(workdir, encoder, step, config, **where)
        folder.mkdir(parents=True, exist_ok=True)
        plan_id = encode_shards(enc, coll, folder, shard_size)
        if record is not None:
            if store is None and (jax.process_index() == 0):
                store = milvus.Store(record, folder)  # Milvus Lite: a file in the index folder
            if store is not None:
                insert_into_milvus(store, folder, plan_id)
        summary: dict[str, Any] = {**enc.meta, "out": str(folder.absolute())}
        if jax.process_index() != 0:
            return {**summary, "process": jax.process_index()}
        manifest = finish_index(folder, plan_id, engine, engine_params, store)
    finally:
        if store is not None:
            store.close()
    return {
        **summary,
        "indexed": manifest["count"],
        "skipped": len(manifest["skipped"]),
        "shards": len(manifest["shards"]),
        "engine": manifest["engine"],
    }


def _milvus_settings(
    engine: str,
    params: dict[str, int],
    given: dict[str, Any] | None,
    folder: Path,
) -> dict[str, Any] | None:
    """The milvus engine's record (None for another engine), checked before any work."""
    engines.check_engine(engine, {} if engine == "milvus" else params)
    if engine != "milvus":
        if given:
            raise CodesError("the --milvus_* options go with --engine milvus")
        return None
    extra = sorted(set(params) - {"nlist", "nprobe"})
    if extra:
        raise CodesError(f"--engine milvus takes no --{', --'.join(extra)}")
    return milvus.settings(
        folder, nlist=params.get("nlist"), nprobe=params.get("nprobe"), **(given or {})
    )
