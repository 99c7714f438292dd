"""Small CNN classifiers for the part models, and the wrappers that become the ONNX graph."""

from __future__ import annotations

import torch
from torch import nn


def conv_block(c_in: int, c_out: int, *, norm: bool) -> list[nn.Module]:
    layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, 3, padding=1, bias=not norm)]
    if norm:
        layers.append(nn.BatchNorm2d(c_out))
    layers.append(nn.ReLU(inplace=True))
    return layers


class TinyNet(nn.Module):
    """Three thin conv stages: enough for bold defects at low resolution, little more."""

    def __init__(self, channels: int, width: int = 8) -> None:
        super().__init__()
        self.features = nn.Sequential(
            *conv_block(channels, width, norm=False),
            nn.MaxPool2d(2),
            *conv_block(width, 2 * width, norm=False),
            nn.MaxPool2d(2),
            *conv_block(2 * width, 2 * width, norm=False),
            nn.AdaptiveMaxPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(2 * width, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.head(self.features(x))
        return logits


class SmallNet(nn.Module):
    """Four batch-normalised stages; global max pooling keeps a small defect's evidence."""

    def __init__(self, channels: int, width: int = 16) -> None:
        super().__init__()
        self.features = nn.Sequential(
            *conv_block(channels, width, norm=True),
            *conv_block(width, width, norm=True),
            nn.MaxPool2d(2),
            *conv_block(width, 2 * width, norm=True),
            nn.MaxPool2d(2),
            *conv_block(2 * width, 3 * width, norm=True),
            nn.MaxPool2d(2),
            *conv_block(3 * width, 4 * width, norm=True),
            nn.AdaptiveMaxPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(4 * width, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.head(self.features(x))
        return logits


class Uint8Nhwc(nn.Module):
    """Takes raw uint8 NHWC pixels and normalises inside the graph (for the gray bundle)."""

    def __init__(self, net: nn.Module, mean: float, std: float) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean))
        self.register_buffer("std", torch.tensor(std))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pixels = x.permute(0, 3, 1, 2).float() / 255.0
        logits: torch.Tensor = self.net((pixels - self.mean) / self.std)
        return logits


class WithSoftmax(nn.Module):
    """The exported graph: logits -> probabilities, as the manifest's output kind promises."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.net(x), dim=1)
