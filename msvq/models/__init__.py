"""Backbone, heads and normalisation layers."""

from msvq.models.batchnorm import SplitBatchNorm2d
from msvq.models.heads import LinearClassifier, ProjectionHead
from msvq.models.resnet import ResNet, resnet18

__all__ = ["LinearClassifier", "ProjectionHead", "ResNet", "SplitBatchNorm2d", "resnet18"]
