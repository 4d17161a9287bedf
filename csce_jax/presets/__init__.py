"""The presets: ``--config NAME`` (or ``configs/NAME.py``), each a ``get_config(arg)``."""
