"""Score a checkpoint: ``python eval.py --workdir runs/x [--config configs/x.py] [--step N]``.

The same command as ``csce-eval`` (``csce_jax.commands.eval``).
"""

from csce_jax.commands.eval import run

if __name__ == "__main__":
    run()
