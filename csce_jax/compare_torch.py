"""The former path of :mod:`csce_jax.bridge.compare` (the same module) and of ``csce-compare``
(``python -m csce_jax.compare_torch``), kept for one release."""

import sys

if __name__ == "__main__":
    import runpy

    runpy.run_module("csce_jax.commands.compare", run_name="__main__", alter_sys=True)
else:
    from csce_jax.bridge import compare

    sys.modules[__name__] = compare
