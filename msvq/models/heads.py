"""Projection head for pretraining and the linear classifier for evaluation."""

from torch import nn


class ProjectionHead(nn.Sequential):
    """Linear(in_dim, hidden_dim), ReLU, Linear(hidden_dim, out_dim), with no batch norm."""

    def __init__(self, in_dim: int, hidden_dim: int = 2048, out_dim: int = 128) -> None:
        super().__init__(
            nn.Linear(in_dim, hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, out_dim),
        )


class LinearClassifier(nn.Linear):
    """One linear layer on frozen features: normal weights with std 0.01, zero bias."""

    def __init__(self, in_dim: int, num_classes: int) -> None:
        super().__init__(in_dim, num_classes)
        nn.init.normal_(self.weight, mean=0.0, std=0.01)
        nn.init.zeros_(self.bias)
