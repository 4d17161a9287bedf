"""A Milvus standalone server for the tests, run by the Python of the venv that holds
``milvus==2.3.5`` (Milvus's embedded build of the real server, with its own etcd): it imports
nothing of csce_jax.

    python milvus_server.py BASE_DIR PORT [--auth]

Starts the server on 127.0.0.1:PORT with its data in BASE_DIR (``--auth``: authentication
on, user root, password Milvus), prints one JSON line ``{"started": pid, "port": PORT}``, then
reads commands from stdin, one a line: ``stop`` (prints ``{"stopped": pid}``), ``start`` (the
same data again) and ``quit``; end of input quits too. The server process gets SIGKILL when
this process dies, however it dies, so no server outlives a test run. :class:`MilvusServer`
is the other end, for the tests and the benchmarks (any Python).
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


class _Popen(subprocess.Popen):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, preexec_fn=_die_with_parent, **kwargs)


def _wait_for_port(port: int, timeout: float = 120.0) -> None:
    """The server says it is healthy before its proxy accepts connections: wait for that."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def _start(server, port: int) -> None:
    server.start()
    if server.listen_port != port:
        raise RuntimeError(f"the server took port {server.listen_port}, not {port}")
    _wait_for_port(port)
    print(json.dumps({"started": server.server_proc.pid, "port": port}), flush=True)


def _bind_reusing(self, port):
    """milvus's port probe, with SO_REUSEADDR as the server's own listeners have: without it a
    port in TIME_WAIT (clients were connected before a stop) reads as taken, and a restart
    moves the server to the next free port."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(("127.0.0.1", port))
        sock.listen()
        return sock
    except OSError:
        sock.close()
        return None


def _stop(server) -> None:
    """SIGTERM, and time to shut down cleanly (milvus's own stop waits 1 s, then kills: its
    sessions then stay registered in etcd and a restart on the same data hangs for minutes)."""
    proc = server.server_proc
    if proc is not None:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
    server.stop()


class MilvusServer:
    """A Milvus 2.3.5 standalone server on 127.0.0.1 (tests/milvus_server.py), authentication
    on; ``stop()`` and ``start()`` it again on the same data and port."""

    def __init__(self, python: str, base: Path, port: int):
        self.port, self.uri = port, f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen(
            [python, __file__, str(base), str(port), "--auth"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.pid = self._answer("started")

    def _answer(self, key: str) -> int:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the Milvus server did not start (exit {self.proc.wait()})")
        return json.loads(line)[key]

    def _send(self, command: str) -> None:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()

    def stop(self) -> None:
        self._send("stop")
        self._answer("stopped")

    def start(self) -> None:
        self._send("start")
        self.pid = self._answer("started")

    def close(self) -> None:
        try:
            self._send("quit")
            self.proc.wait(timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()
        deadline = time.monotonic() + 20
        while Path(f"/proc/{self.pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        if Path(f"/proc/{self.pid}").exists():  # never leave a server behind
            os.kill(self.pid, signal.SIGKILL)


def main() -> None:
    base, port, auth = sys.argv[1], int(sys.argv[2]), "--auth" in sys.argv[3:]
    import milvus

    milvus.subprocess.Popen = _Popen  # the server binary dies with this process
    milvus.MilvusServerConfig.try_bind_port = _bind_reusing
    server = milvus.default_server
    server.set_base_dir(base)
    server.listen_port = port
    server.config.set("authorization_enabled", auth)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        _start(server, port)
        for line in sys.stdin:
            command = line.strip()
            if command == "stop":
                pid = server.server_proc.pid
                _stop(server)
                print(json.dumps({"stopped": pid}), flush=True)
            elif command == "start":
                _start(server, port)
            elif command == "quit":
                break
    finally:
        _stop(server)


if __name__ == "__main__":
    main()
