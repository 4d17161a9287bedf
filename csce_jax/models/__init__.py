"""Flax NNX models: the ResNet trunk and CSCE-Net."""

from csce_jax.models.csce import CSCENet, CSCEOutput, HashCenters
from csce_jax.models.resnet import ResNet

__all__ = ["CSCENet", "CSCEOutput", "HashCenters", "ResNet"]
