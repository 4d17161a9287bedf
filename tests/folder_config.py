"""A tiny image-folder config for the record-set tests (their images come from the test)."""

from csce_jax.config import base_config, data_config


def get_config(arg=None):
    c = base_config()
    c.data = data_config("folder")
    c.data.resize, c.data.crop = 24, 20
    c.data.query_fraction, c.data.val_fraction = 0.3, 0.2
    return c
