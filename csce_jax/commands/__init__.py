"""The console commands ``csce-train`` and ``csce-eval`` (also ``python train.py`` and
``python eval.py`` in a checkout). Each tunes the host allocator and starts catching stop
signals before it imports JAX, then parses its flags, so that ``--help`` is quick."""
