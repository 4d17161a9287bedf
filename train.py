"""Train CSCE-Net: ``python train.py --config configs/<dataset>.py --workdir runs/x``.

The same command as ``csce-train`` (``csce_jax.commands.train``): any field with
``--config.a.b=value`` (every field: ``python -m csce_jax.config``), config arguments
``--config configs/cub200.py:bits=48``; rerunning the same command resumes from the latest
checkpoint in the workdir.
"""

from csce_jax.commands.train import run

if __name__ == "__main__":
    run()
