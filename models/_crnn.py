"""Convolutional recurrent genre classifier."""

from __future__ import annotations

import torch
from torch import nn

from models._layers import (
    ConvBlock,
    channel_widths,
    check_dropout,
    check_frequency_depth,
    check_n_classes,
    check_positive_int,
)
from models._registry import register_model

_KERNEL_SIZE = 3


def _block_pool(index: int) -> tuple[int, int]:
    # Halve the mel axis in every block but the frame axis only in every other block, so
    # the GRU input keeps a sequence of n_frames / 2 ** ceil(n_conv_layers / 2) steps.
    return (2, 2) if index % 2 == 0 else (2, 1)


@register_model("crnn")
class GenreCRNN(nn.Module):
    """Conv blocks followed by a GRU over time and a linear head.

    The conv blocks (Conv2d -> BatchNorm2d -> ReLU -> MaxPool2d, channels doubling up to
    256) halve the mel axis in every block and the frame axis in every other block. The
    mel axis is then averaged away, a GRU reads the remaining frames, and the final hidden
    state of its last layer (both directions, if bidirectional) feeds the head. The design
    follows Choi, Fazekas, Sandler and Cho (2017), "Convolutional recurrent neural
    networks for music classification", ICASSP 2017.

    Args:
        n_classes: Number of output logits, at least 2.
        n_mels: Number of mel bands of the input. It must be at least
            ``2 ** n_conv_layers`` so that pooling keeps at least one band.
        n_conv_layers: Number of conv blocks. Default: 3.
        base_channels: Output channels of the first block. Default: 16.
        rnn_hidden_size: GRU hidden size per direction. Default: 64.
        rnn_layers: Number of stacked GRU layers. Default: 1.
        bidirectional: Whether the GRU also reads the frames backwards. Default: True.
        dropout: Dropout probability before the head and, when ``rnn_layers > 1``,
            between GRU layers, in [0, 1). Default: 0.2.

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
        rnn_hidden_size: int = 64,
        rnn_layers: int = 1,
        bidirectional: bool = True,
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        check_n_classes(n_classes)
        check_frequency_depth(n_conv_layers, n_mels)
        check_positive_int("base_channels", base_channels)
        check_positive_int("rnn_hidden_size", rnn_hidden_size)
        check_positive_int("rnn_layers", rnn_layers)
        check_dropout(dropout)

        widths = channel_widths(base_channels, n_conv_layers)
        in_widths = [1, *widths[:-1]]
        self.features = nn.Sequential(
            *(
                ConvBlock(in_width, width, kernel_size=_KERNEL_SIZE, pool=_block_pool(index))
                for index, (in_width, width) in enumerate(zip(in_widths, widths, strict=True))
            )
        )
        self.n_directions = 2 if bidirectional else 1
        self.rnn = nn.GRU(
            input_size=widths[-1],
            hidden_size=rnn_hidden_size,
            num_layers=rnn_layers,
            batch_first=True,
            bidirectional=bidirectional,
            # nn.GRU applies dropout only between layers and warns when there is one layer.
            dropout=dropout if rnn_layers > 1 else 0.0,
        )
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(self.n_directions * rnn_hidden_size, n_classes)

    def forward(self, spectrogram: torch.Tensor) -> torch.Tensor:
        """Return the logits (batch, n_classes) of a (batch, 1, n_mels, n_frames) input."""
        feature_map = self.features(spectrogram)  # (batch, channels, mel, frames)
        sequence = feature_map.mean(dim=2).transpose(1, 2)  # (batch, frames, channels)
        _, hidden = self.rnn(sequence.contiguous())  # (layers * directions, batch, hidden)
        last_layer = hidden[-self.n_directions :]  # (directions, batch, hidden)
        summary = last_layer.transpose(0, 1).flatten(1)  # (batch, directions * hidden)
        logits: torch.Tensor = self.head(self.dropout(summary))  # (batch, n_classes)
        return logits
