"""Fully convolutional genre classifier."""

from __future__ import annotations

import torch
from torch import nn

from models._layers import (
    ConvBlock,
    channel_widths,
    check_dropout,
    check_frequency_depth,
    check_kernel_size,
    check_n_classes,
    check_positive_int,
)
from models._registry import register_model


@register_model("cnn")
class GenreCNN(nn.Module):
    """2-D CNN over a log-mel spectrogram with global pooling and a linear head.

    Each block is Conv2d -> BatchNorm2d -> ReLU -> MaxPool2d(2), and the channels double
    per block up to 256. Global average and max pooling over mel bands and frames make
    the head independent of the clip length. The design follows the fully convolutional
    network of Choi, Fazekas and Sandler (2016), "Automatic tagging using deep
    convolutional neural networks", ISMIR 2016.

    Args:
        n_classes: Number of output logits, at least 2.
        n_mels: Number of mel bands of the input. It must be at least
            ``2 ** n_conv_layers`` so that pooling keeps at least one band.
        n_conv_layers: Number of conv blocks. Default: 3.
        base_channels: Output channels of the first block. Default: 16.
        kernel_size: Square kernel size, odd. Default: 3.
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
        n_conv_layers: int = 3,
        base_channels: int = 16,
        kernel_size: int = 3,
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        check_n_classes(n_classes)
        check_frequency_depth(n_conv_layers, n_mels)
        check_positive_int("base_channels", base_channels)
        check_kernel_size(kernel_size)
        check_dropout(dropout)

        widths = channel_widths(base_channels, n_conv_layers)
        in_widths = [1, *widths[:-1]]
        self.features = nn.Sequential(
            *(
                ConvBlock(in_width, width, kernel_size=kernel_size, pool=(2, 2))
                for in_width, width in zip(in_widths, widths, strict=True)
            )
        )
        self.dropout = nn.Dropout(dropout)
        # Average and max pooled features are concatenated, hence twice the width.
        self.head = nn.Linear(2 * widths[-1], n_classes)

    def forward(self, spectrogram: torch.Tensor) -> torch.Tensor:
        """Return the logits (batch, n_classes) of a (batch, 1, n_mels, n_frames) input."""
        feature_map = self.features(spectrogram)  # (batch, channels, mel, frames)
        average = feature_map.mean(dim=(2, 3))  # (batch, channels)
        maximum = feature_map.amax(dim=(2, 3))  # (batch, channels)
        pooled = torch.cat([average, maximum], dim=1)  # (batch, 2 * channels)
        logits: torch.Tensor = self.head(self.dropout(pooled))  # (batch, n_classes)
        return logits
