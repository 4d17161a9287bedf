"""The ``milvus`` engine: an index's codes in a Milvus collection, embedded or on a cluster.

``--milvus_uri`` is a Milvus Lite file (default ``<index>/milvus.db``: a pip package, no
server) or an ``http(s)://`` address of a standalone or distributed Milvus; the same client
code talks to both. A token for a server is read from the environment (``$MILVUS_TOKEN``, or
the variable ``--milvus_token_env`` names), never written anywhere.

One collection per index folder (``--milvus_collection``, default ``csce_<folder name>``):

  item     INT64 primary key   the image's row in the collection of images (list line, file)
  code     BINARY_VECTOR       the packed code, its bits padded with zeros to whole bytes
  label    VARCHAR             the label text (a sub-folder, or a list's classes "3,17")
  classes  ARRAY of VARCHAR    the label text cut at its commas (["3", "17"]); servers only
  path     VARCHAR             the image's absolute path

searched with the HAMMING metric through ``BIN_FLAT`` (exact) or ``BIN_IVF_FLAT`` (``nlist``
lists, ``nprobe`` visited; servers only: Milvus Lite refuses it). A label filter is
``label == L or array_contains(classes, L)`` on a server (Milvus 2.3 refuses a ``like``
pattern with a leading ``%``); on Milvus Lite, which runs those patterns and inserts an ARRAY
field about 20 times slower, and on a collection made before the field existed, it is
``label == L`` or ``like`` patterns for L among the comma-separated classes. Every call has a
time limit (``CALL_TIMEOUT_S``), so a server that goes away is one line, not a hang; searching
never flushes (a flush right after a server restarts fails for a minute). The collection's
description holds the index plan (checkpoint, bits, centres, images), so a collection that
holds another plan is refused. Each shard is written as one unit: its items' rows deleted,
then inserted in batches, then a marker ``shards/NNNNN.milvus.json`` written; a rerun skips
marked shards and rewrites any other, so no item is ever in the collection twice (Milvus does
not refuse a repeated primary key by itself).
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from csce_jax.errors import CodesError
from csce_jax.utils.atomic import write_json_atomically

INSTALL = "pip install pymilvus==2.6.17 milvus-lite==2.5.1 'setuptools<81'"
LITE_FILE = "milvus.db"
INDEX_TYPES = {"bin_flat": "BIN_FLAT", "bin_ivf_flat": "BIN_IVF_FLAT"}
TOKEN_ENV = "MILVUS_TOKEN"
BATCH = 10_000
STARTING_RETRIES = 6  # calls retried while a just-started Milvus Lite readies its storage
CONNECT_TIMEOUT_S = 10.0  # a server that does not answer within this is down or unreachable
# A Milvus Lite file's server is a process started here; pymilvus gives up on its socket after
# about 3 s of retries. It answers in about 0.6 s on an idle 2-core VM, later while the disk is
# busy (another server starting, a large write), so it is asked again for up to this long.
LITE_START_S = 60.0
LITE_STARTING = "Fail connecting to server"  # started, not answering yet
CALL_TIMEOUT_S = 30.0  # any one call: a server that stopped answering is an error, not a hang
SEARCH_BATCH = 100  # queries per search call, so that a large batch stays within the limit
MAX_CLASSES = 4096  # Milvus's largest ARRAY capacity
MAX_LABEL = 65_535
SQLITE_MAGIC = b"SQLite format 3\x00"  # a Milvus Lite file is an SQLite database
PLAN_FIELDS = ("bits", "centers", "workdir", "step", "collection", "count", "shard_size")


def _pymilvus():
    try:
        import pymilvus
    except ImportError:
        raise CodesError(f"the milvus engine needs pymilvus and Milvus Lite: {INSTALL}") from None
    _quiet_clients()
    return pymilvus


def _from_milvus_lite(record: logging.LogRecord) -> bool:
    return f"{os.sep}milvus_lite{os.sep}" in record.pathname


def _quiet_clients() -> None:
    """Every failed call is reported once, as a :class:`CodesError` naming the server and the
    collection: pymilvus' own error log (a traceback per failed call) and Milvus Lite's
    (written on the root logger) would repeat it, so they are kept out of the output."""
    logging.getLogger("pymilvus").setLevel(logging.CRITICAL)
    root = logging.getLogger()
    if not any(getattr(f, "__name__", "") == "_not_milvus_lite" for f in root.filters):

        def _not_milvus_lite(record: logging.LogRecord) -> bool:
            return record.levelno >= logging.CRITICAL or not _from_milvus_lite(record)

        root.addFilter(_not_milvus_lite)


def is_server(uri: str) -> bool:
    return uri.startswith(("http://", "https://", "tcp://", "grpc://"))


def default_collection(folder: Path) -> str:
    """``csce_`` and the index folder's name in the characters Milvus allows."""
    name = re.sub(r"[^A-Za-z0-9_]", "_", Path(folder).absolute().name)
    return f"csce_{name}"[:255]


def settings(
    folder: Path,
    *,
    uri: str | None = None,
    collection: str | None = None,
    index: str = "bin_flat",
    token_env: str = TOKEN_ENV,
    nlist: int | None = None,
    nprobe: int | None = None,
) -> dict[str, Any]:
    """The engine record (what the manifest keeps: no token), checked before anything is
    written. A Lite file is recorded relative to the index folder, so the folder can move."""
    if index not in INDEX_TYPES:
        raise CodesError(f"--milvus_index={index!r}: expected one of {', '.join(INDEX_TYPES)}")
    uri = uri or LITE_FILE
    if not is_server(uri) and index != "bin_flat":
        raise CodesError(
            f"--milvus_index={index}: Milvus Lite ({uri}) searches BIN_FLAT only; use "
            "bin_flat, or a Milvus server (--milvus_uri http://host:19530)"
        )
    params: dict[str, Any] = {"index": index}
    if index == "bin_ivf_flat":
        params.update(nlist=nlist or 1024, nprobe=nprobe or 16)
    name = collection or default_collection(folder)
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,254}", name):
        raise CodesError(
            f"--milvus_collection={name!r}: a Milvus collection name is letters, digits and "
            "underscores, not starting with a digit"
        )
    return {
        "name": "milvus",
        "uri": uri,
        "collection": name,
        "token_env": token_env,
        "params": params,
    }


class Store:
    """One index's collection on a Milvus (Lite file or server), opened for the engine
    ``record`` (see :func:`settings`)."""

    def __init__(self, record: dict[str, Any], folder: Path):
        self.record, self.folder = record, Path(folder)
        self.collection = record["collection"]
        uri = record["uri"]
        self.where = uri if is_server(uri) else str(self.folder / uri)
        self.token_env = record.get("token_env", TOKEN_ENV)
        self.client = _connect(self.where, os.environ.get(self.token_env), self.token_env)
        self._fields: set[str] | None = None

    def close(self) -> None:
        """Close the connection; for a Milvus Lite file also stop its server process, so
        that none is left behind and the file can be opened again (or copied) cleanly."""
        try:
            self.client.close()
        except Exception:  # closing a broken connection: nothing left to do
            pass
        if not is_server(self.where):
            from milvus_lite.server_manager import server_manager_instance

            server_manager_instance.release_server(self.where)

    def _call(self, what: str, fn, *args, **kwargs):
        kwargs.setdefault("timeout", CALL_TIMEOUT_S)
        for attempt in range(STARTING_RETRIES + 1):
            try:
                return fn(*args, **kwargs)
            except Exception as e:
                if isinstance(e, CodesError):
                    raise
                # A Milvus Lite server just started may not have its storage ready yet
                # ("Mmap manager has not been init"): a moment later the call succeeds.
                if "has not been init" in str(e) and attempt < STARTING_RETRIES:
                    time.sleep(0.5 * (attempt + 1))
                    continue
                raise CodesError(
                    f"Milvus at {self.where}, collection {self.collection}: {what} failed: "
                    f"{_reason(e, not is_server(self.where), self.token_env)}"
                ) from None

    # --- building --------------------------------------------------------------------------

    def ensure(self, plan: dict[str, Any], plan_id: str, bits: int) -> None:
        """Create the collection for ``plan``, or check that the one there holds it."""
        if self._call("listing collections", self.client.has_collection, self.collection):
            self.check_plan(plan_id, plan)
            return
        pymilvus = _pymilvus()
        dtype = pymilvus.DataType
        description = json.dumps({"plan": plan_id, **{k: plan.get(k) for k in PLAN_FIELDS}})
        schema = pymilvus.MilvusClient.create_schema(
            auto_id=False, enable_dynamic_field=False, description=description
        )
        schema.add_field("item", dtype.INT64, is_primary=True)
        schema.add_field("code", dtype.BINARY_VECTOR, dim=8 * -(-bits // 8))
        schema.add_field("label", dtype.VARCHAR, max_length=MAX_LABEL)
        if is_server(self.where):  # Milvus Lite runs the like filter, and inserts an ARRAY
            schema.add_field(  # field about 20 times slower
                "classes",
                dtype.ARRAY,
                element_type=dtype.VARCHAR,
                max_capacity=MAX_CLASSES,
                max_length=MAX_LABEL,
            )
        schema.add_field("path", dtype.VARCHAR, max_length=MAX_LABEL)
        index = self.client.prepare_index_params()
        kind = INDEX_TYPES[self.record["params"]["index"]]
        extra = {"nlist": self.record["params"]["nlist"]} if kind == "BIN_IVF_FLAT" else {}
        index.add_index(field_name="code", index_type=kind, metric_type="HAMMING", params=extra)
        self._call(
            "creating the collection",
            self.client.create_collection,
            self.collection,
            schema=schema,
            index_params=index,
        )

    def _describe(self) -> dict[str, Any]:
        info = self._call(
            "reading the collection", self.client.describe_collection, self.collection
        )
        self._fields = {f["name"] for f in info.get("fields", [])}
        return info

    def has_classes(self) -> bool:
        """Whether the collection has the ``classes`` field (made by this version or later)."""
        if self._fields is None:
            self._describe()
        return "classes" in (self._fields or set())

    def saved_plan(self) -> dict[str, Any]:
        info = self._describe()
        try:
            return json.loads(info.get("description") or "{}")
        except json.JSONDecodeError:
            return {}

    def check_plan(self, plan_id: str, plan: dict[str, Any] | None = None) -> None:
        """Refuse a collection that holds another index plan, naming what differs."""
        saved = self.saved_plan()
        if saved.get("plan") == plan_id:
            return
        if plan is None:
            differ = ["its plan"]
        else:
            differ = [k for k in PLAN_FIELDS if saved.get(k) != plan.get(k)] or ["its plan"]
        raise CodesError(
            f"Milvus at {self.where}: collection {self.collection} holds another index "
            f"({', '.join(differ)} differ): drop it, or choose --milvus_collection"
        )

    def insert_shard(
        self, shard: dict[str, np.ndarray], marker: Path, plan_id: str, progress=None
    ) -> int:
        """Put one shard's codes in the collection (its items' earlier rows deleted first),
        then mark it done. Returns the number of codes."""
        rows = shard["rows"].astype(np.int64)
        if len(rows):
            low, high = int(rows.min()), int(rows.max())
            self._call(
                "deleting a shard's earlier rows",
                self.client.delete,
                self.collection,
                filter=f"item >= {low} and item <= {high}",
            )
        classes = self.has_classes()
        for start in range(0, len(rows), BATCH):
            part = slice(start, start + BATCH)
            data = [
                {"item": int(i), "code": c.tobytes(), "label": str(lab), "path": str(p)}
                | ({"classes": class_list(str(lab))} if classes else {})
                for i, c, lab, p in zip(
                    rows[part],
                    shard["codes"][part],
                    shard["labels"][part],
                    shard["paths"][part],
                    strict=True,
                )
            ]
            self._call("inserting codes", self.client.insert, self.collection, data)
            if progress is not None:
                progress(min(start + BATCH, len(rows)))
        record = {"plan": plan_id, "collection": self.collection, "count": len(rows)}
        write_json_atomically(marker, {**record, "uri": self.record["uri"]})
        return len(rows)

    def flush(self) -> None:
        """Seal what was inserted (once, at the end of a build)."""
        self._call("flushing", self.client.flush, self.collection)

    def count(self) -> int:
        """The rows in the collection, every insert included (strong consistency: no flush,
        which fails for a while after a server restarts)."""
        got = self._call(
            "counting rows",
            self.client.query,
            self.collection,
            "",
            output_fields=["count(*)"],
            consistency_level="Strong",
        )
        return int(got[0]["count(*)"])

    # --- searching -------------------------------------------------------------------------

    def check_index(self, plan_id: str, count: int) -> None:
        """The collection must still be the one this index built (one clear line if not)."""
        if not self._call("listing collections", self.client.has_collection, self.collection):
            raise CodesError(
                f"Milvus at {self.where}: collection {self.collection} is gone (dropped "
                "outside csce_jax): run the same `search index` command again"
            )
        self.check_plan(plan_id)
        got = self.count()
        if got != count:
            raise CodesError(
                f"Milvus at {self.where}: collection {self.collection} holds {got} codes but "
                f"the index {count} (changed outside csce_jax): run the same `search index` "
                "command again"
            )
        self._call("loading the collection", self.client.load_collection, self.collection)

    def search(
        self, packed: np.ndarray, k: int, label: str | None = None
    ) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Per query: (items, distances) as Milvus returns them (``label``: only items whose
        label is it, or one of its classes)."""
        params: dict[str, Any] = {"metric_type": "HAMMING"}
        if "nprobe" in self.record["params"]:
            params["params"] = {"nprobe": self.record["params"]["nprobe"]}
        queries = [q.tobytes() for q in np.ascontiguousarray(packed, np.uint8)]
        where = label_filter(label, self.has_classes()) if label else ""
        found = []
        for start in range(0, len(queries), SEARCH_BATCH):
            found += self._call(
                "searching",
                self.client.search,
                self.collection,
                data=queries[start : start + SEARCH_BATCH],
                anns_field="code",
                limit=k,
                search_params=params,
                filter=where,
                output_fields=[],
            )
        items = [np.asarray([h["id"] for h in hits], np.int64) for hits in found]
        dists = [
            np.asarray([h["distance"] for h in hits]).round().astype(np.int64) for hits in found
        ]
        return items, dists


def class_list(label: str) -> list[str]:
    """The classes a label text names ("3,17" -> ["3", "17"]), as the filter matches them."""
    return label.split(",")[:MAX_CLASSES] if label else []


def label_filter(label: str, classes: bool = True) -> str:
    """A Milvus filter for items whose label text is ``label`` or lists it among its
    comma-separated classes (``classes``: through the ARRAY field, else ``like`` patterns,
    for a collection made without it)."""
    text = json.dumps(str(label))  # a quoted string literal with its escapes
    if classes:
        return f"label == {text} or array_contains(classes, {text})"
    bare = text[1:-1]
    return (
        f'label == {text} or label like "{bare},%" or label like "%,{bare}" '
        f'or label like "%,{bare},%"'
    )


LITE_GONE = ("Fail connecting to server", "Open local milvus failed", "server unavailable")


def _reason(e: Exception, lite: bool = False, token_env: str = TOKEN_ENV) -> str:
    """The client's message on one line; a refused token said as such (pymilvus reports it as
    a server unavailable, with gRPC's UNAUTHENTICATED only in the exception's chain); for a
    Milvus Lite file whose server process stopped or could not start, the likely causes."""
    if (refused := _unauthenticated(e)) is not None:
        given = "no token was given" if refused.startswith("missing") else "its token was refused"
        return (
            f"the server needs authentication and {given} ({refused}): set ${token_env} to "
            "user:password or an API key"
        )
    message = " ".join(str(getattr(e, "message", None) or str(e) or type(e).__name__).split())
    if lite and any(s in message for s in LITE_GONE):
        message += (
            " (Milvus Lite's server process for this file stopped or did not start: a full "
            "disk, or a killed process; free space, then run the same command again)"
        )
    return message


def _unauthenticated(e: BaseException) -> str | None:
    """gRPC's UNAUTHENTICATED details anywhere in ``e``'s cause and context chain, or None."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        code = getattr(e, "code", None)
        if callable(code):
            try:
                name = getattr(code(), "name", "")
            except Exception:  # not a gRPC error after all
                name = ""
            if name == "UNAUTHENTICATED":
                details = e.details() if callable(getattr(e, "details", None)) else ""
                return " ".join(str(details or "UNAUTHENTICATED").split())
        e = e.__cause__ or e.__context__
    return None


def _connect(where: str, token: str | None, token_env: str = TOKEN_ENV):
    """A client of the Milvus at ``where`` (a Lite file path or a server address)."""
    pymilvus = _pymilvus()
    if not is_server(where):
        path = Path(where)
        if path.exists() and _header(path) not in (SQLITE_MAGIC, b""):
            raise CodesError(
                f"{path} is not a Milvus Lite file (damaged, or something else): remove it and "
                "run the same `search index` command again"
            )
        with warnings.catch_warnings():  # milvus-lite 2.5.1 imports the deprecated pkg_resources
            warnings.simplefilter("ignore")
            try:
                import milvus_lite  # noqa: F401
            except ImportError:
                raise CodesError(
                    f"the milvus engine needs Milvus Lite for a file URI: {INSTALL}"
                ) from None
    kwargs: dict[str, Any] = {"timeout": CONNECT_TIMEOUT_S}
    if token:
        kwargs["token"] = token
    lite = not is_server(where)
    deadline = time.monotonic() + LITE_START_S
    while True:
        try:
            client = pymilvus.MilvusClient(where, **kwargs)
            client.list_collections()
            return client
        except Exception as e:
            message = str(getattr(e, "message", None) or e)
            if lite and LITE_STARTING in message and time.monotonic() < deadline:
                time.sleep(0.5)  # the same server process, asked again
                continue
            what = "open the Milvus Lite file" if lite else "reach Milvus at"
            raise CodesError(f"cannot {what} {where}: {_reason(e, lite, token_env)}") from None


def _header(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(len(SQLITE_MAGIC))


def marker_path(shard: Path) -> Path:
    """The file that says a shard is in the collection."""
    return shard.with_name(f"{shard.stem}.milvus.json")


def read_marker(path: Path, plan_id: str, collection: str) -> dict[str, Any] | None:
    try:
        marker = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    ok = marker.get("plan") == plan_id and marker.get("collection") == collection
    return marker if ok else None
