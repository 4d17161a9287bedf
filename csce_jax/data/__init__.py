"""Input pipelines: sources, protocols, the embedded digits set, and grain loaders."""

from csce_jax.data.datasets import DATASETS, RetrievalData, load_data, stratified_split
from csce_jax.data.images import DataError
from csce_jax.data.pipeline import EvalLoader, TrainLoader, ViewConfig, Workers

__all__ = [
    "DATASETS",
    "DataError",
    "EvalLoader",
    "RetrievalData",
    "TrainLoader",
    "ViewConfig",
    "Workers",
    "load_data",
    "stratified_split",
]
