"""ResNet-18, CIFAR variant, with a width multiplier and optional split batch norm."""

from collections.abc import Callable
from functools import partial

import torch
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock

from msvq.models.batchnorm import SplitBatchNorm2d


class ResNet(nn.Module):
    """ResNet of BasicBlocks with a 3x3 stride-1 stem and no classifier.

    Stage widths are width, 2*width, 4*width and 8*width. forward returns the globally
    average-pooled features (B, feature_dim), with feature_dim = 8*width.
    Parameter names follow torchvision's ResNet (conv1, bn1, layer1..layer4), minus fc.
    """

    def __init__(
        self,
        blocks_per_stage: tuple[int, int, int, int],
        width: int = 64,
        in_channels: int = 3,
        maxpool: bool = False,
        norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d,
    ) -> None:
        super().__init__()
        self._norm_layer = norm_layer
        self._in_planes = width

        self.conv1 = nn.Conv2d(in_channels, width, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = norm_layer(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1) if maxpool else nn.Identity()

        self.layer1 = self._make_stage(width, blocks_per_stage[0], stride=1)
        self.layer2 = self._make_stage(2 * width, blocks_per_stage[1], stride=2)
        self.layer3 = self._make_stage(4 * width, blocks_per_stage[2], stride=2)
        self.layer4 = self._make_stage(8 * width, blocks_per_stage[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = 8 * width

        # The initialisation of torchvision's ResNet.
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def _make_stage(self, planes: int, num_blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self._in_planes != planes:
            downsample = nn.Sequential(
                nn.Conv2d(self._in_planes, planes, kernel_size=1, stride=stride, bias=False),
                self._norm_layer(planes),
            )

        blocks = [BasicBlock(self._in_planes, planes, stride, downsample, norm_layer=self._norm_layer)]
        self._in_planes = planes
        for _ in range(1, num_blocks):
            blocks.append(BasicBlock(planes, planes, norm_layer=self._norm_layer))
        return nn.Sequential(*blocks)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)


def resnet18(width: int = 64, in_channels: int = 3, maxpool: bool = False, bn_splits: int = 1) -> ResNet:
    """Build the CIFAR ResNet-18 (2 BasicBlocks per stage), 8*width features.

    maxpool keeps the stem's 3x3 stride-2 max-pool (used for 64 px inputs).
    bn_splits > 1 puts SplitBatchNorm2d with that many splits in every norm layer.
    """
    if width < 1:
        raise ValueError(f"width must be a positive integer, got {width}")
    if bn_splits < 1:
        raise ValueError(f"bn_splits must be at least 1, got {bn_splits}")

    norm_layer = nn.BatchNorm2d if bn_splits == 1 else partial(SplitBatchNorm2d, num_splits=bn_splits)
    return ResNet((2, 2, 2, 2), width=width, in_channels=in_channels, maxpool=maxpool, norm_layer=norm_layer)
