"""Convolution blocks and argument checks shared by the model families."""

from __future__ import annotations

from torch import nn

MAX_CHANNELS = 256


class ConvBlock(nn.Sequential):
    """Conv2d -> BatchNorm2d -> ReLU -> MaxPool2d over a (batch, channel, mel, frame) map.

    The convolution keeps the map size (odd kernel, "same" padding). The pooling uses
    ``ceil_mode``, so an axis of length 1 stays 1 instead of shrinking to 0. A clip with
    fewer frames than the total pooling factor therefore still yields one frame.

    Args:
        in_channels: Channels of the input map.
        out_channels: Channels of the output map.
        kernel_size: Square convolution kernel size, odd.
        pool: Pooling kernel and stride as (mel, frame).
    """

    def __init__(
        self, in_channels: int, out_channels: int, *, kernel_size: int, pool: tuple[int, int]
    ) -> None:
        super().__init__(
            # No bias, because BatchNorm2d right after it adds its own shift.
            nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(pool, ceil_mode=True),
        )


def channel_widths(base_channels: int, n_conv_layers: int) -> list[int]:
    """Return the output channels of each block: doubling from ``base_channels``, capped."""
    return [min(base_channels * 2**index, MAX_CHANNELS) for index in range(n_conv_layers)]


def check_positive_int(name: str, value: int) -> None:
    """Raise ValueError unless ``value`` is an int of at least 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {name}={value!r}.")


def check_kernel_size(kernel_size: int) -> None:
    """Raise ValueError unless ``kernel_size`` is a positive odd int."""
    check_positive_int("kernel_size", kernel_size)
    if kernel_size % 2 == 0:
        raise ValueError(
            f"kernel_size must be odd so that padding keeps the map size, got "
            f"kernel_size={kernel_size}. Use {kernel_size - 1} or {kernel_size + 1}."
        )


def check_dropout(dropout: float) -> None:
    """Raise ValueError unless ``dropout`` is a probability in [0, 1)."""
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got dropout={dropout!r}.")


def check_frequency_depth(n_conv_layers: int, n_mels: int, *, name: str = "n_conv_layers") -> None:
    """Raise ValueError if halving ``n_mels`` once per block would go below one band.

    ``name`` is the parameter that counts the halvings, shown in the message.
    """
    check_positive_int(name, n_conv_layers)
    check_positive_int("n_mels", n_mels)
    max_layers = n_mels.bit_length() - 1  # floor(log2(n_mels))
    if n_conv_layers > max_layers:
        raise ValueError(
            f"Too many downsampling blocks for the mel bands: {name}={n_conv_layers} halves "
            f"the frequency axis below 1 band with n_mels={n_mels}. "
            f"Use {name} <= {max_layers} or more mel bands."
        )


def check_n_classes(n_classes: int) -> None:
    """Raise ValueError unless there are at least two classes."""
    check_positive_int("n_classes", n_classes)
    if n_classes < 2:
        raise ValueError(f"A classifier needs at least 2 classes, got n_classes={n_classes}.")
