"""The config: one schema of every field (``schema``), the recipes presets are made of
(``recipes``), and loading from files (``files``). The presets are ``csce_jax/presets/``."""

from csce_jax.config.files import (
    apply_overrides,
    load_config_file,
    presets,
    read_config_json,
    resolve_spec,
)
from csce_jax.config.recipes import (
    apply_release,
    parse_arg,
    release_recipe,
    release_training,
    small_cpu_recipe,
)
from csce_jax.config.schema import (
    FIELDS,
    base_config,
    check_config,
    choices,
    data_config,
    resolve_epochs,
    resumable,
)

__all__ = [
    "FIELDS",
    "apply_overrides",
    "apply_release",
    "base_config",
    "check_config",
    "choices",
    "data_config",
    "load_config_file",
    "parse_arg",
    "presets",
    "read_config_json",
    "release_recipe",
    "release_training",
    "resolve_epochs",
    "resolve_spec",
    "resumable",
    "small_cpu_recipe",
]
