"""Small residual CNN genre classifier."""

from __future__ import annotations

import torch
from torch import nn

from models._layers import (
    channel_widths,
    check_dropout,
    check_frequency_depth,
    check_n_classes,
    check_positive_int,
)
from models._registry import register_model


class ResidualBlock(nn.Module):
    """Two 3x3 convolutions with batch norm and an identity or 1x1 projection shortcut.

    Args:
        in_channels: Channels of the input map.
        out_channels: Channels of the output map.
        stride: Stride of the first convolution and of the projection, on both axes.
    """

    def __init__(self, in_channels: int, out_channels: int, *, stride: int) -> None:
        super().__init__()
        self.residual = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
        )
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        self.activation = nn.ReLU(inplace=True)

    def forward(self, feature_map: torch.Tensor) -> torch.Tensor:
        """Return the block output (batch, out_channels, mel / stride, frames / stride)."""
        output: torch.Tensor = self.activation(
            self.residual(feature_map) + self.shortcut(feature_map)
        )
        return output


@register_model("resnet")
class GenreResNet(nn.Module):
    """Small residual CNN over a log-mel spectrogram with global pooling and a linear head.

    A 3x3 stem convolution is followed by ``n_stages`` stages of residual blocks. The
    first block of each stage has stride 2, which halves the mel and frame axes, and the
    channels double per stage up to 256. Global average and max pooling make the head
    independent of the clip length. The residual blocks follow He, Zhang, Ren and Sun
    (2016), "Deep residual learning for image recognition", CVPR 2016.

    Args:
        n_classes: Number of output logits, at least 2.
        n_mels: Number of mel bands of the input. It must be at least ``2 ** n_stages``
            so that the strided blocks keep at least one band.
        n_stages: Number of residual stages. Default: 3.
        blocks_per_stage: Residual blocks in each stage. Default: 1.
        base_channels: Output channels of the stem and the first stage. Default: 16.
        dropout: Dropout probability before the head, in [0, 1). Default: 0.2.

    Shape:
        Input (batch, 1, n_mels, n_frames) float32 normalized log-mel, any n_frames >= 1.
        Output (batch, n_classes) logits.
    """

    def __init__(
        self,
        n_classes: int,
        n_mels: int,
        *,
        n_stages: int = 3,
        blocks_per_stage: int = 1,
        base_channels: int = 16,
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        check_n_classes(n_classes)
        check_frequency_depth(n_stages, n_mels, name="n_stages")
        check_positive_int("blocks_per_stage", blocks_per_stage)
        check_positive_int("base_channels", base_channels)
        check_dropout(dropout)

        self.stem = nn.Sequential(
            nn.Conv2d(1, base_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(base_channels),
            nn.ReLU(inplace=True),
        )
        blocks: list[nn.Module] = []
        in_width = base_channels
        for width in channel_widths(base_channels, n_stages):
            for index in range(blocks_per_stage):
                stride = 2 if index == 0 else 1
                blocks.append(ResidualBlock(in_width, width, stride=stride))
                in_width = width
        self.stages = nn.Sequential(*blocks)
        self.dropout = nn.Dropout(dropout)
        # Average and max pooled features are concatenated, hence twice the width.
        self.head = nn.Linear(2 * in_width, n_classes)

    def forward(self, spectrogram: torch.Tensor) -> torch.Tensor:
        """Return the logits (batch, n_classes) of a (batch, 1, n_mels, n_frames) input."""
        feature_map = self.stages(self.stem(spectrogram))  # (batch, channels, mel, frames)
        average = feature_map.mean(dim=(2, 3))  # (batch, channels)
        maximum = feature_map.amax(dim=(2, 3))  # (batch, channels)
        pooled = torch.cat([average, maximum], dim=1)  # (batch, 2 * channels)
        logits: torch.Tensor = self.head(self.dropout(pooled))  # (batch, n_classes)
        return logits
