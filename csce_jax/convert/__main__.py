"""``python -m csce_jax.convert``: the former path of ``csce-convert`` (:mod:`csce_jax.commands.convert`),
kept for one release."""

from csce_jax.commands.convert import main

main()
