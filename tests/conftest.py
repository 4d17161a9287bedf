"""Test setup: 4 fake CPU devices (set before jax is imported) and the helpers tests share.

Helpers are plain functions (``from conftest import run_train``): the digits demo cut down to a
few steps, the entry point run as a subprocess, and readers of a run's outputs.
"""

import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The suite's own XLA compilation cache (and $CSCE_JAX_CACHE), never the user's: shared by the
# in-process tests, the train.py subprocesses and the xdist workers of a run, which all
# compile the same tiny programs. A cache hit gives the same executable, so no result depends
# on which test filled it.
os.environ["CSCE_JAX_CACHE"] = str(Path(tempfile.gettempdir()) / f"csce_jax_tests_{os.getuid()}")
# Every process the suite starts inherits this mark (xdist workers take the controller's); the
# leftover check at the end counts only marked processes, not a shell beside the suite.
os.environ.setdefault("CSCE_JAX_TEST_SESSION", f"{os.getpid()}-{time.time_ns()}")
sys.path.insert(0, os.path.dirname(__file__))

import pytest

from csce_jax.runtime import startup

startup.enable_compilation_cache("auto")

ROOT = Path(__file__).resolve().parents[1]
TINY = {"width": 1 / 16, "depths": (1, 1, 1, 1)}
TINY_OVERRIDES = [
    "--config.batch_size=8",
    "--config.eval_batch_size=64",
    "--config.log_every_steps=1",
    "--config.data.num_workers=2",
    "--config.data.worker_processes=False",  # threads start at once; processes: test_pipeline
]
PREEMPTED = 75  # train.py's exit status after a stop signal (config.preempted_exit_code)


@pytest.fixture
def tiny_model():
    """A narrow CSCE-Net (f3: 64 channels, f4: 128) at 128x128 with 10 classes, 16 bits."""
    from flax import nnx

    from csce_jax.hashing import hash_centers
    from csce_jax.models import CSCENet

    return CSCENet(hash_centers(10, 16), image_size=128, rngs=nnx.Rngs(0), **TINY)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, worker_id):
    """A finished 3-step demo run through train.py, shared read-only by the tests that
    evaluate, search or inspect a run (none of them may change its checkpoints or rows).
    Under xdist the first worker to ask trains it, in the run's common temporary folder, and
    the others wait for it and read the same run."""
    if worker_id == "master":
        return _train_shared_run(tmp_path_factory.mktemp("trained_run"))
    shared = tmp_path_factory.getbasetemp().parent  # this pytest run's, common to its workers
    with open(shared / "trained_run.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        workdir = shared / "trained_run"
        if not (shared / "trained_run.done").exists():
            shutil.rmtree(workdir, ignore_errors=True)  # a worker that died half way
            _train_shared_run(workdir)
            (shared / "trained_run.done").touch()
    return workdir


def _train_shared_run(workdir: Path) -> Path:
    run_train(
        workdir,
        "--config.total_steps=3",
        "--config.eval_every_steps=3",
        "--config.checkpoint_every_steps=3",
    )
    return workdir


def tiny_config(steps=4, linear_optimizer=False):
    """The digits demo cut down; ``linear_optimizer``: SGD at a constant rate, whose update is
    linear in the gradient (Adam's first steps are ~lr * sign(g): float noise in a near-zero
    gradient flips a whole step, which would hide real sharding differences)."""
    from csce_jax.presets.default import get_config

    c = get_config()
    c.total_steps = steps
    c.batch_size = 8
    c.eval_batch_size = 64
    c.log_every_steps = 1
    c.eval_every_steps = steps
    c.checkpoint_every_steps = steps
    c.data.num_workers, c.data.worker_processes = 2, False
    if linear_optimizer:
        c.optimizer.name = "sgd"
        c.optimizer.lr = 0.05
        c.optimizer.warmup_steps = 0
        c.optimizer.schedule = "constant"
    return c


def run_train(
    workdir,
    *extra,
    check=True,
    background=False,
    env=None,
    config="configs/default.py",
    new_session=False,
):
    """``train.py`` on the tiny demo in a subprocess; ``check``: it must exit 0;
    ``new_session``: it leads a process group of its own."""
    cmd = [
        sys.executable,
        "train.py",
        "--config",
        config,
        "--workdir",
        str(workdir),
        *TINY_OVERRIDES,
        *extra,
    ]
    if background:
        return subprocess.Popen(
            cmd,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            start_new_session=new_session,
        )
    out = subprocess.run(
        cmd,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        start_new_session=new_session,
    )
    if check:
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def run_job(commands, *, env=None, timeout=900, grace=60):
    """Run the processes of one job (e.g. two train.py joined by jax.distributed) to the end;
    returns [(stdout and stderr, exit status)]. When one fails, the others (which would wait
    for it) get ``grace`` seconds, then are killed with their process groups, as is anything
    still running after ``timeout``: a test fails with every process's output, none is left."""
    procs = [
        subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        for cmd in commands
    ]
    texts = [[] for _ in procs]
    readers = [
        threading.Thread(target=lambda p=p, t=t: t.append(p.stdout.read()), daemon=True)
        for p, t in zip(procs, texts, strict=True)
    ]
    for r in readers:
        r.start()
    start, failed = time.monotonic(), None
    try:
        while any(p.poll() is None for p in procs):
            now = time.monotonic()
            if failed is None and any(p.poll() not in (None, 0) for p in procs):
                failed = now
            if now - start > timeout or (failed is not None and now - failed > grace):
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        for r in readers:
            r.join(30)
    outs = []
    for i, (p, t) in enumerate(zip(procs, texts, strict=True)):
        note = (
            f"\n[process {i} killed by the test: the job did not finish]"
            if p.returncode == -9
            else ""
        )
        outs.append(("".join(t) + note, p.returncode))
    return outs


def with_file_size_limit(cmd: list[str], limit: int) -> list[str]:
    """``cmd`` run under a file size limit (RLIMIT_FSIZE, inherited by its children): a write
    past ``limit`` bytes fails with EFBIG, as a full disk refuses one, and SIGXFSZ is ignored
    so that the write returns the error instead of killing the process. Set in a small Python
    that then execs ``cmd`` (no preexec_fn, which would fork a process that runs JAX)."""
    setup = (
        "import os, resource, signal, sys; "
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
        f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit})); "
        "os.execv(sys.argv[1], sys.argv[1:])"
    )
    return [sys.executable, "-c", setup, *cmd]


def run_module(*args, env=None):
    """``python *args`` from the repository root (eval.py, -m csce_jax.search, ...)."""
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600, env=env
    )


def read_rows(workdir):
    """The rows of ``<workdir>/metrics.jsonl``."""
    return [json.loads(x) for x in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def saved_steps(workdir):
    """The checkpoint steps in a run folder."""
    folder = Path(workdir) / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit())


def restore_state(workdir, config, step=None):
    """(step, state) of a run's newest (or ``step``) checkpoint, restored with ``config``."""
    from csce_jax.data import load_data
    from csce_jax.runs import state
    from csce_jax.runs.builders import run_parts
    from csce_jax.runs.checkpoints import Checkpoints
    from csce_jax.runtime import sharding

    data = load_data(config.data)
    parts = run_parts(config, data.num_classes, abstract=True)
    repl = sharding.replicated(sharding.make_mesh())
    abstract = state.abstract_train_state(
        parts.model, parts.tx, parts.schedule, parts.fingerprint, repl
    )
    ckpts = Checkpoints(workdir, read_only=True)
    try:
        got, restored, _ = ckpts.restore_state(abstract.state, step)
    finally:
        ckpts.manager.close()
    return got, restored


def final_params(workdir, steps, **kw):
    """The parameters of a tiny run's checkpoint at ``steps`` as numpy arrays."""
    import jax
    import numpy as np

    step, restored = restore_state(workdir, tiny_config(steps, **kw))
    assert step == steps
    return jax.tree.map(np.asarray, restored["params"])


# --- No process left behind ------------------------------------------------------------------

LEFTOVER_GRACE_SECONDS = 15
SESSION_MARK = "CSCE_JAX_TEST_SESSION"  # set at the top of this file


def _processes() -> dict[int, tuple[int, int, int, str]]:
    """pid -> (parent pid, session id, start time in ticks, command line), from /proc."""
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        out[int(entry.name)] = (int(fields[1]), int(fields[3]), int(fields[19]), cmd.strip())
    return out


def children_of(pid: int) -> list[int]:
    """The live child processes of ``pid``."""
    return [p for p, (ppid, _, _, _) in _processes().items() if ppid == pid]


def _marked(pid: int) -> bool:
    """Whether process ``pid`` carries this test session's mark in its environment."""
    mark = f"{SESSION_MARK}={os.environ[SESSION_MARK]}".encode()
    try:
        return mark in (Path("/proc") / str(pid) / "environ").read_bytes().split(b"\0")
    except OSError:
        return False


def leftover_processes() -> list[str]:
    """Orphans this test session made: processes carrying its mark, started after it, whose
    parent is gone (adopted by init). A worker whose parent a test killed, a server started
    in a subprocess that outlived it."""
    if not Path("/proc/self/stat").exists():
        return []
    procs = _processes()
    me = procs.get(os.getpid())
    if me is None:
        return []
    began = me[2]
    return [
        f"{pid}: {cmd}"
        for pid, (ppid, _, start, cmd) in procs.items()
        if ppid == 1 and start >= began and cmd and _marked(pid)
    ]


def pytest_sessionfinish(session, exitstatus):
    """The suite leaves no process behind: a worker orphaned by a killed parent, a server a
    test forgot. Checked by the controlling process, after a grace period for exits."""
    if hasattr(session.config, "workerinput") or not Path("/proc").is_dir():
        return
    deadline = time.monotonic() + LEFTOVER_GRACE_SECONDS
    left = leftover_processes()
    while left and time.monotonic() < deadline:
        time.sleep(0.5)
        left = leftover_processes()
    if left:
        print("\nprocesses left running by the tests:\n  " + "\n  ".join(left), file=sys.stderr)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


MILVUS_SERVER_TOKEN = "root:Milvus"  # the server's built-in user, authentication on


def milvus_items(folder) -> list[int]:
    """Every item of an index folder's Milvus collection, one entry per row (a duplicate
    shows twice), after checking that the collection holds as many rows as the index."""
    from csce_jax.search import load_index, milvus

    index = load_index(folder)
    store = milvus.Store(index.meta["engine"], folder)
    try:
        assert store.count() == len(index.paths)
        rows = store.client.query(
            store.collection, "item >= 0", output_fields=["item"], limit=16384
        )
        return sorted(r["item"] for r in rows)
    finally:
        store.close()


def milvus_server_python() -> str | None:
    """The Python of the venv that holds ``milvus==2.3.5`` (the embedded standalone server):
    ``$CSCE_MILVUS_SERVER_PYTHON``, else ``.venv-milvus`` in the repository (``.ci/run`` makes
    it), if it can import milvus."""
    python = os.environ.get("CSCE_MILVUS_SERVER_PYTHON") or str(ROOT / ".venv-milvus/bin/python")
    if not Path(python).exists():
        return None
    found = subprocess.run([python, "-c", "import milvus"], capture_output=True, timeout=60)
    return python if found.returncode == 0 else None


@pytest.fixture(scope="session")
def milvus_server(tmp_path_factory):
    """One Milvus server for the whole test run (its tests share one xdist group, so one
    worker runs them all), in a temporary base folder, stopped at the end."""
    python = milvus_server_python()
    if python is None and os.environ.get("CSCE_REQUIRE_MILVUS_SERVER"):
        pytest.fail("CSCE_REQUIRE_MILVUS_SERVER is set but no Milvus server can be started")
    if python is None:
        pytest.skip(
            "the Milvus server is absent: python3.11 -m venv .venv-milvus && "
            ".venv-milvus/bin/pip install milvus==2.3.5"
        )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    from milvus_server import MilvusServer

    server = MilvusServer(python, tmp_path_factory.mktemp("milvus_server"), port)
    try:
        yield server
    finally:
        server.close()
