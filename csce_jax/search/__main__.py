"""``python -m csce_jax.search``: the former path of ``csce-search`` (:mod:`csce_jax.commands.search`),
kept for one release."""

from csce_jax.commands.search import main

main()
