"""One process of the multi-process test: ``python distributed_worker.py PORT NPROC ID WORKDIR``.

Sets up its fake CPU devices and gloo collectives before JAX starts, joins the job on
127.0.0.1, and trains the tiny digits config through the library.
"""

import os
import sys

port, nproc, pid, workdir = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={4 // nproc}"
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")
if nproc > 1:
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}", num_processes=nproc, process_id=pid
    )

from conftest import tiny_config  # noqa: E402

from csce_jax import train_lib  # noqa: E402

config = tiny_config(3, linear_optimizer=True)
config.distributed = False  # already initialised above
final = train_lib.train_and_evaluate(config, workdir)
print("FINAL", final, flush=True)
