"""Every command of the package, one module each; libraries hold no command line.

========================  ===================================  ==============================
console script            module                               what it does
========================  ===================================  ==============================
``csce-train``            ``commands.train`` (``train.py``)    train or resume a run
``csce-eval``             ``commands.eval`` (``eval.py``)      score a checkpoint or codes
``csce-search``           ``commands.search``                  index, query, serve a search
``csce-convert``          ``commands.convert``                 weights to and from PyTorch
``csce-compare``          ``commands.compare``                 JAX against PyTorch
``csce-prepare``          ``commands.prepare``                 write a record set
``csce-verify``           ``commands.verify``                  check every image up front
``csce-splits``           ``commands.splits``                  write split list files
``csce-plan``             ``commands.plan``                    compile for a TPU slice or GPU
========================  ===================================  ==============================

Each is also ``python -m csce_jax.commands.<name>``. The convention:

- A command that reads a config (``--config NAME|path.py[:args]`` and ``--config.a.b=value``)
  uses absl flags through :func:`csce_jax.commands.cli.flags_parser`, so that every config error is one
  line and every key is checked against the schema (``python -m csce_jax.config`` lists
  them); ``csce-splits`` uses the same parser without a config. A command made of
  sub-commands (``csce-search index|query|serve``, ``csce-convert DIRECTION``) uses argparse,
  whose sub-parsers absl lacks.
- ``run()`` (absl) or ``main(argv)`` (argparse) is the console script's target. It defines the
  flags, imports JAX only after parsing (a quick ``--help``, which exits 0 and lists the
  command's own flags), and calls one library function inside :func:`csce_jax.commands.cli.
  error_boundary`: an input or system error is one ``error:`` line and exit 1.
- Commands import libraries; no library imports a command or :mod:`csce_jax.commands.cli`.
"""
