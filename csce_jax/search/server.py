"""``search serve``: a local search page over one index.

  GET  /                     the page (upload or pick a query; top k hits as thumbnails)
  GET  /api/info             the index: size, bits, checkpoint, engine
  POST /api/search?k=K       body: an image file -> its hits
  GET  /api/search?item=N&k=K  indexed image N as the query (its stored code) -> its hits
  GET  /thumb/N              a thumbnail of indexed image N

The server binds 127.0.0.1 by default; on any other address it needs a token, and then every
request without ``Authorization: Bearer <token>`` is answered 401 (the page itself comes with
that 401 and asks for the token once). It reads only the index's own images, named by their
number in the index (never a path from the request), keeps uploads in memory and writes no
file. A bad upload (empty, not an image, too large in bytes or pixels, an ambiguous length)
gets a 4xx answer with a one-line message; a client that leaves before its answer is one line
in the log.
"""

from __future__ import annotations

import base64
import functools
import hmac
import io
import ipaddress
import json
import socket
import sys
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

from PIL import Image

from csce_jax.data.images import MAX_RESIZED_PIXELS, load_rgb, resized_size
from csce_jax.errors import CodesError, CsceError
from csce_jax.retrieval.metrics import unpack_codes
from csce_jax.search.queries import Searcher

MAX_UPLOAD_BYTES = 20 * 2**20
REQUEST_TIMEOUT = 30.0  # seconds a client may stall while sending its request
DRAIN_SECONDS = 2.0  # after a refused upload: how long its unread bytes are read and dropped
MAX_PIXELS = 40_000_000  # of the upload as stored
MAX_K = 100
THUMB = 160
PAGE = (Path(__file__).parent / "page.html").read_text()


class UploadError(CsceError):
    """An upload the server refuses; its message goes back to the page."""

    def __init__(self, message: str, status: HTTPStatus = HTTPStatus.BAD_REQUEST):
        super().__init__(message)
        self.status = status


def check_upload(data: bytes, resize: int) -> Image.Image:
    """The uploaded image, or UploadError saying why it is refused (read in memory only)."""
    if not data:
        raise UploadError("empty upload: choose an image file")
    try:
        with Image.open(io.BytesIO(data)) as probe:
            width, height = probe.size
            probe.verify()
    except Image.DecompressionBombError:
        raise UploadError("the image has too many pixels") from None
    except Exception:
        raise UploadError("not an image: the upload is no image format Pillow reads") from None
    rw, rh = resized_size(width, height, resize)
    if width * height > MAX_PIXELS or rw * rh > MAX_RESIZED_PIXELS:
        raise UploadError(
            f"image of {width} x {height} pixels refused: at most {MAX_PIXELS:,} pixels, and "
            f"{MAX_RESIZED_PIXELS:,} once its shorter side is {resize}"
        )
    try:
        return load_rgb(data, where="the upload")
    except CsceError as e:
        raise UploadError(f"the image does not decode: {e}") from None


def _thumb_bytes(image: Image.Image) -> bytes:
    image = image.copy()
    image.thumbnail((THUMB, THUMB))
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=85)
    return buf.getvalue()


TOKEN_ENV = "CSCE_SEARCH_TOKEN"
CLIENT_GONE = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, TimeoutError)


class ServeError(CsceError):
    """The page cannot be served as asked (a shared address without a token)."""


def is_loopback(host: str) -> bool:
    """Whether every address ``host`` names is a loopback one (only this machine can reach)."""
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise ServeError(f"--host {host}: {e.strerror}") from None
    return all(ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback for info in infos)


def check_token(host: str, token: str | None) -> None:
    """A page reachable from other machines must ask for a token."""
    if token is not None and not token.strip():
        raise ServeError(f"the token is empty: give a secret with --token or ${TOKEN_ENV}")
    if token is None and not is_loopback(host):
        raise ServeError(
            f"--host {host} is reachable from other machines: serving it needs a token "
            f"(--token, or ${TOKEN_ENV}); clients then send 'Authorization: Bearer <token>'"
        )


class SearchServer(ThreadingHTTPServer):
    """The HTTP server over one Searcher; queries are encoded one at a time. ``token``: every
    request must carry it as ``Authorization: Bearer <token>`` (needed off loopback)."""

    daemon_threads = True
    # Connections waiting to be accepted (socketserver's default is 5): 32 clients that open
    # a connection per request overflow 5, and the kernel then resets or delays them.
    request_queue_size = 128

    def __init__(
        self,
        searcher: Searcher,
        host: str = "127.0.0.1",
        port: int = 8000,
        token: str | None = None,
    ):
        check_token(host, token)
        super().__init__((host, port), _Handler)
        self.token = None if token is None else token.encode()
        self.request_timeout = REQUEST_TIMEOUT
        self.searcher = searcher
        self.encode_lock = threading.Lock()
        self.log_lock = threading.Lock()  # handler threads log whole lines, never interleaved
        self.thumb = functools.lru_cache(maxsize=4096)(self._thumb)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/"

    def info(self) -> dict[str, Any]:
        meta = self.searcher.index.meta
        return {
            "count": len(self.searcher.index.paths),
            "bits": meta["bits"],
            "workdir": meta["workdir"],
            "step": meta["step"],
            "engine": meta["engine"]["name"],
            "collection": meta.get("collection", {}).get("described", ""),
        }

    def authorized(self, header: str | None) -> bool:
        """Whether an ``Authorization`` header carries the token (compared in constant time)."""
        if self.token is None:
            return True
        scheme, _, given = (header or "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(
            given.strip().encode(), self.token
        )

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that left before its answer was sent is one line; anything else is a
        fault of the server and keeps its traceback."""
        error = sys.exc_info()[1]
        with self.log_lock:
            if isinstance(error, CLIENT_GONE):
                host, port = client_address[:2]
                sys.stderr.write(f"client {host}:{port} left before its answer was sent\n")
                sys.stderr.flush()
                return
            super().handle_error(request, client_address)

    def _thumb(self, item: int) -> bytes | None:
        try:
            return _thumb_bytes(load_rgb(self.searcher.index.paths[item]))
        except (CsceError, OSError):
            return None

    def hits_of_item(self, item: int, k: int, label: str | None = None) -> dict[str, Any]:
        index = self.searcher.index
        code = unpack_codes(index.codes[item : item + 1], index.meta["bits"])
        return {
            "query": {"item": item, "path": index.paths[item]},
            "hits": self.searcher.hits(code, k, label)[0],
        }

    def hits_of_upload(self, data: bytes, k: int, label: str | None = None) -> dict[str, Any]:
        image = check_upload(data, self.searcher.encoder.resize)
        with self.encode_lock:
            code = self.searcher.encoder.encode_one(data, "the upload")
        thumb = base64.b64encode(_thumb_bytes(image)).decode()
        return {
            "query": {"thumb": f"data:image/jpeg;base64,{thumb}"},
            "hits": self.searcher.hits(code, k, label)[0],
        }


class _Handler(BaseHTTPRequestHandler):
    server: SearchServer

    def setup(self) -> None:
        # A client that announces more bytes than it sends (or stalls) is cut off after
        # ``request_timeout``; the other clients are served meanwhile (a thread each).
        self.timeout = self.server.request_timeout
        super().setup()

    def log_message(self, format: str, *args: Any) -> None:  # quiet: errors only
        return

    def _read_body(self, length: int) -> bytes:
        """Up to ``length`` bytes of the body: fewer where the client stops sending (closed,
        or silent for ``request_timeout``)."""
        parts, got = [], 0
        try:
            while got < length and (chunk := self.rfile.read1(length - got)):
                parts.append(chunk)
                got += len(chunk)
        except TimeoutError:
            pass
        return b"".join(parts)

    def _refuse_unread_body(self) -> None:
        """After an answer sent without reading the body (too large): stop writing, read and
        drop what the client still sends for a moment, so that closing does not reset the
        connection before the client has read the answer."""
        self.close_connection = True
        self.wfile.flush()
        try:
            self.connection.shutdown(socket.SHUT_WR)
            self.connection.settimeout(0.2)
            deadline = time.monotonic() + DRAIN_SECONDS
            while time.monotonic() < deadline and self.connection.recv(1 << 16):
                pass
        except OSError:
            pass

    def _send(self, status: int, body: bytes, kind: str) -> None:
        self.send_response(status)
        if status == HTTPStatus.UNAUTHORIZED:
            self.send_header("WWW-Authenticate", 'Bearer realm="csce-search"')
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def _json(self, value: dict[str, Any], status: int = HTTPStatus.OK) -> None:
        self._send(status, json.dumps(value).encode(), "application/json")

    def _error(self, status: int, message: str) -> None:
        self._json({"error": message}, status)

    def _k(self, query: dict[str, list[str]]) -> int:
        raw = query.get("k", ["10"])[0]
        if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= MAX_K:
            raise UploadError(f"k={raw!r}: expected a whole number from 1 to {MAX_K}")
        return int(raw)

    def _label(self, query: dict[str, list[str]]) -> str | None:
        raw = query.get("label", [""])[0].strip()
        if len(raw) > 200:
            raise UploadError("label: at most 200 characters")
        return raw or None

    def _item(self, raw: str) -> int:
        count = len(self.server.searcher.index.paths)
        if raw.isdigit() and not raw.isascii():  # digits of another script: a bad request
            raise UploadError(f"item={raw!r}: expected a whole number from 0 to {count - 1}")
        if not (raw.isascii() and raw.isdigit()) or int(raw) >= count:
            raise UploadError(f"no indexed image {raw!r} (0 to {count - 1})", HTTPStatus.NOT_FOUND)
        return int(raw)

    def _refuse_unauthorized(self, page: bool = False) -> bool:
        """Answer 401 where the token is missing or wrong (the page comes with it, so that
        a browser can ask for the token); True when refused."""
        if self.server.authorized(self.headers.get("Authorization")):
            return False
        self.close_connection = True  # an unread upload body is not read
        if page:
            self._send(HTTPStatus.UNAUTHORIZED, PAGE.encode(), "text/html; charset=utf-8")
        else:
            self._error(HTTPStatus.UNAUTHORIZED, "this page needs its token: Bearer <token>")
        return True

    def _content_length(self) -> int:
        """The upload's one length: two that differ, or a length beside Transfer-Encoding, are
        ambiguous (RFC 9112 6.3) and refused; a chunked upload is asked to give its length."""
        values = self.headers.get_all("Content-Length") or []
        lengths = {part.strip() for value in values for part in value.split(",")}
        if self.headers.get("Transfer-Encoding") is not None:
            self.close_connection = True
            if lengths:
                raise UploadError("ambiguous length: Content-Length beside Transfer-Encoding")
            raise UploadError("the upload has no length", HTTPStatus.LENGTH_REQUIRED)
        if len(lengths) > 1:
            self.close_connection = True
            raise UploadError(f"ambiguous length: Content-Length {' and '.join(sorted(lengths))}")
        length = next(iter(lengths), None)
        if length is None or not (length.isascii() and length.isdigit()):
            raise UploadError("the upload has no length", HTTPStatus.LENGTH_REQUIRED)
        return int(length)

    def do_GET(self) -> None:
        url = urlparse(self.path)
        query = parse_qs(url.query)
        if self._refuse_unauthorized(page=url.path == "/"):
            return
        try:
            if url.path == "/":
                self._send(HTTPStatus.OK, PAGE.encode(), "text/html; charset=utf-8")
            elif url.path == "/api/info":
                self._json(self.server.info())
            elif url.path == "/api/search":
                item = self._item(query.get("item", [""])[0])
                self._json(self.server.hits_of_item(item, self._k(query), self._label(query)))
            elif url.path.startswith("/thumb/"):
                thumb = self.server.thumb(self._item(url.path[len("/thumb/") :]))
                if thumb is None:
                    raise UploadError("that indexed image cannot be read", HTTPStatus.NOT_FOUND)
                self._send(HTTPStatus.OK, thumb, "image/jpeg")
            else:
                self._error(HTTPStatus.NOT_FOUND, f"no page {url.path}")
        except UploadError as e:
            self._error(e.status, str(e))
        except CodesError as e:  # the engine failed (a Milvus server gone): said, not raised
            self._error(HTTPStatus.SERVICE_UNAVAILABLE, str(e))

    def do_POST(self) -> None:
        url = urlparse(self.path)
        if self._refuse_unauthorized():
            self._refuse_unread_body()
            return
        try:
            if url.path != "/api/search":
                raise UploadError(f"no page {url.path}", HTTPStatus.NOT_FOUND)
            query = parse_qs(url.query)
            k, label = self._k(query), self._label(query)
            length = self._content_length()
            if length > MAX_UPLOAD_BYTES:
                self._error(
                    HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                    f"upload of {length / 2**20:.1f} MiB refused: at most "
                    f"{MAX_UPLOAD_BYTES // 2**20} MiB",
                )
                self._refuse_unread_body()
                return
            body = self._read_body(length)
            if len(body) < length:  # the client stopped sending before its length
                self.close_connection = True
                raise UploadError(
                    f"the upload ended after {len(body)} of {length} bytes (timed out)",
                    HTTPStatus.REQUEST_TIMEOUT,
                )
            self._json(self.server.hits_of_upload(body, k, label))
        except UploadError as e:
            self._error(e.status, str(e))
            if self.close_connection:  # an ambiguous or unread body: drop it, then close
                self._refuse_unread_body()
        except CodesError as e:
            self._error(HTTPStatus.UNPROCESSABLE_ENTITY, str(e))


def serve(
    searcher: Searcher, host: str = "127.0.0.1", port: int = 8000, token: str | None = None
) -> None:
    """Serve the page until Ctrl-C; the first line printed is its address (never the token)."""
    server = SearchServer(searcher, host, port, token)
    guard = "; token required" if token is not None else ""
    count = server.info()["count"]
    print(f"serving {server.url} ({count:,} images{guard}; Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
