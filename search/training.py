"""The training loop of one trial: data resident on the device, one report per epoch."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from features import FeatureSet, Splits


class DeviceError(ValueError):
    """The requested training device is invalid or not available on this machine."""


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN or infinite loss."""


@dataclass
class TrialData:
    """Normalized log-mel segments of one split pair, on one device.

    Attributes:
        x_train: (n_train, 1, n_mels, n_frames) float32.
        y_train: (n_train,) int64 class indices.
        x_valid: (n_valid, 1, n_mels, n_frames) float32.
        y_valid: (n_valid,) int64 class indices.
        valid_tracks: (n_valid,) int64 index of each validation segment's track.
        mean: (n_mels,) per-bin mean of the training segments, in dB.
        std: (n_mels,) per-bin standard deviation of the training segments, in dB.
        classes: Genre names, in class-index order.
        train_tracks: (n_train,) int64 index of each training segment's track, or ``None``
            when unknown (then every epoch trains on every segment).
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_valid: torch.Tensor
    y_valid: torch.Tensor
    valid_tracks: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    classes: tuple[str, ...]
    train_tracks: torch.Tensor | None = None

    @property
    def n_mels(self) -> int:
        return int(self.x_train.shape[2])


@dataclass(frozen=True)
class EpochResult:
    """Metrics of one finished epoch (``epoch`` counts from 1).

    Attributes:
        seconds: Wall time of the epoch (training and validation), in seconds.
        step_seconds: Time spent in forward, backward and optimizer steps of the training
            batches, in seconds. On CPU it sums the step calls only. On other devices it is
            the whole training loop, ended by one synchronize on CUDA, so it also counts the
            batch gathers on the device.
        eval_seconds: Time of the validation pass, in seconds.
    """

    epoch: int
    train_loss: float
    val_loss: float
    val_accuracy: float
    seconds: float
    step_seconds: float = 0.0
    eval_seconds: float = 0.0

    def metrics(self) -> dict[str, float]:
        """Return the metrics logged for every epoch."""
        return {"train_loss": self.train_loss, "val_loss": self.val_loss,
                "val_accuracy": self.val_accuracy}


@dataclass(frozen=True)
class TrainingOptions:
    """Per-trial optimization settings."""

    optimizer: str
    learning_rate: float
    weight_decay: float
    batch_size: int
    epochs: int
    seed: int
    mixed_precision: bool = True
    channels_last: bool = True
    compile: bool = False
    segments_per_track: int | None = None


def prepare_data(feature_set: FeatureSet, splits: Splits, device: torch.device) -> TrialData:
    """Copy the training and validation segments to ``device``, normalized per mel bin.

    Statistics come from the training split only, so validation data does not leak into
    normalization.
    """
    train_index = feature_set.segment_indices(splits.train)
    valid_index = feature_set.segment_indices(splits.valid)
    if len(train_index) == 0 or len(valid_index) == 0:
        raise ValueError(
            f"empty split: n_train_segments={len(train_index)}, "
            f"n_valid_segments={len(valid_index)}. Add tracks or change the split fractions."
        )
    x_train = _to_device(feature_set.features, train_index, device)
    mean = x_train.mean(dim=(0, 2))  # (n_mels,)
    std = x_train.std(dim=(0, 2)).clamp_min(1e-3)
    x_train = ((x_train - mean[:, None]) / std[:, None]).unsqueeze(1)  # (n, 1, mels, frames)
    x_valid = _to_device(feature_set.features, valid_index, device)
    x_valid = ((x_valid - mean[:, None]) / std[:, None]).unsqueeze(1)
    labels = torch.from_numpy(np.array(feature_set.labels, dtype=np.int64))
    tracks = torch.from_numpy(np.array(feature_set.segment_tracks, dtype=np.int64))
    return TrialData(
        x_train=x_train,
        y_train=labels[train_index].to(device),
        x_valid=x_valid,
        y_valid=labels[valid_index].to(device),
        valid_tracks=tracks[valid_index].to(device),
        mean=mean,
        std=std,
        classes=tuple(feature_set.classes),
        train_tracks=tracks[train_index].to(device),
    )


def _to_device(features: np.ndarray, index: np.ndarray, device: torch.device) -> torch.Tensor:
    # Fancy indexing reads only the selected segments from the memory-mapped cache.
    selected = np.ascontiguousarray(features[index])
    return torch.from_numpy(selected).to(device=device, dtype=torch.float32)


def train_model(
    model: nn.Module,
    data: TrialData,
    options: TrainingOptions,
    device: torch.device,
    *,
    on_epoch: Callable[[EpochResult], None],
) -> list[EpochResult]:
    """Train ``model`` for ``options.epochs`` epochs, calling ``on_epoch`` after each.

    ``on_epoch`` may raise (``optuna.TrialPruned`` does) to stop training early.

    Raises:
        NonFiniteLossError: A training or validation loss was NaN or infinite.
    """
    generator = torch.Generator(device="cpu").manual_seed(options.seed)
    draw = _epoch_sampler(data, options.segments_per_track)
    use_cuda_speedups = device.type == "cuda"
    model = model.to(device)
    if use_cuda_speedups and options.channels_last:
        model = model.to(memory_format=torch.channels_last)
    runnable: nn.Module = torch.compile(model) if options.compile else model  # type: ignore[assignment]
    optimizer = _create_optimizer(model, options)
    loss_function = nn.CrossEntropyLoss()
    autocast = use_cuda_speedups and options.mixed_precision

    results: list[EpochResult] = []
    for epoch in range(1, options.epochs + 1):
        started = time.perf_counter()
        order = draw(generator).to(data.x_train.device)
        train_loss, step_seconds = _train_one_epoch(runnable, data, order, optimizer,
                                                    loss_function, options, autocast=autocast)
        eval_started = time.perf_counter()
        val_loss, val_accuracy = evaluate(runnable, data.x_valid, data.y_valid, options.batch_size,
                                          autocast=autocast)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        finished = time.perf_counter()
        seconds = finished - started
        for name, value in (("train_loss", train_loss), ("val_loss", val_loss)):
            if not math.isfinite(value):
                raise NonFiniteLossError(f"{name}={value} at epoch {epoch}: training diverged. "
                                         f"Lower the learning rate range.")
        result = EpochResult(epoch=epoch, train_loss=train_loss, val_loss=val_loss,
                             val_accuracy=val_accuracy, seconds=seconds,
                             step_seconds=step_seconds, eval_seconds=finished - eval_started)
        results.append(result)
        on_epoch(result)
    return results


def _epoch_sampler(
    data: TrialData, segments_per_track: int | None
) -> Callable[[torch.Generator], torch.Tensor]:
    """Return a function that draws one epoch's shuffled training indices (CPU int64)."""
    n_samples = int(data.x_train.shape[0])
    if segments_per_track is None:
        return lambda generator: torch.randperm(n_samples, generator=generator)
    if data.train_tracks is None:
        raise ValueError(f"segments_per_track={segments_per_track} needs the track of each "
                         f"training segment, but TrialData.train_tracks is None. Build the "
                         f"data with prepare_data or pass train_tracks.")
    tracks = data.train_tracks.to("cpu")
    return lambda generator: draw_segments_per_track(tracks, segments_per_track, generator)


def draw_segments_per_track(
    tracks: torch.Tensor, segments_per_track: int, generator: torch.Generator
) -> torch.Tensor:
    """Draw up to ``segments_per_track`` random segments of every track, in shuffled order.

    Vectorized: every segment gets a random rank inside its track (a random permutation,
    then a stable sort by track), and the segments ranked below ``segments_per_track`` are
    kept. A track with fewer segments keeps all of them.

    Args:
        tracks: (n_segments,) int64 track index of each segment, on the CPU.
        segments_per_track: Segments to keep per track, at least 1.
        generator: CPU random generator; the same state gives the same draw.

    Returns:
        (n_kept,) int64 segment indices in random order.
    """
    shuffled = torch.randperm(tracks.numel(), generator=generator)
    by_track = torch.sort(tracks[shuffled], stable=True)
    grouped = shuffled[by_track.indices]  # segments grouped by track, random order inside
    _, counts = torch.unique_consecutive(by_track.values, return_counts=True)
    starts = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
    rank = torch.arange(tracks.numel()) - starts
    kept = grouped[rank < segments_per_track]
    return kept[torch.randperm(kept.numel(), generator=generator)]


def _train_one_epoch(
    model: nn.Module,
    data: TrialData,
    order: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    loss_function: nn.Module,
    options: TrainingOptions,
    *,
    autocast: bool,
) -> tuple[float, float]:
    """Train on the segments ``order`` names, in that order.

    Returns the mean training loss and the seconds spent in training steps.
    """
    model.train()
    device = data.x_train.device
    n_samples = int(order.numel())
    total_loss = torch.zeros((), device=device)
    # Per-step clocks are exact on CPU. On an accelerator they would need a synchronize per
    # step, so the whole loop is timed instead, with one synchronize at its end on CUDA.
    time_each_step = device.type == "cpu"
    step_seconds = 0.0
    loop_started = time.perf_counter()
    for start in range(0, n_samples, options.batch_size):
        index = order[start:start + options.batch_size]
        inputs, targets = data.x_train[index], data.y_train[index]
        step_started = time.perf_counter()
        with _autocast(inputs.device, enabled=autocast):
            loss = loss_function(model(inputs), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if time_each_step:
            step_seconds += time.perf_counter() - step_started
        total_loss += loss.detach() * len(index)
    if not time_each_step:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        step_seconds = time.perf_counter() - loop_started
    # One device-to-host transfer per epoch instead of one per step.
    return float(total_loss.item()) / n_samples, step_seconds


@torch.no_grad()
def evaluate(
    model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, batch_size: int,
    *, autocast: bool = False,
) -> tuple[float, float]:
    """Return the mean cross-entropy loss and the accuracy of ``model`` on a split."""
    logits = predict_logits(model, inputs, batch_size, autocast=autocast)
    loss = nn.functional.cross_entropy(logits, targets).item()
    accuracy = (logits.argmax(dim=1) == targets).float().mean().item()
    return float(loss), float(accuracy)


@torch.no_grad()
def predict_logits(model: nn.Module, inputs: torch.Tensor, batch_size: int,
                   *, autocast: bool = False) -> torch.Tensor:
    """Return float32 logits (n, n_classes) of ``model`` in eval mode, batch by batch."""
    model.eval()
    outputs = []
    for start in range(0, inputs.shape[0], max(batch_size, 64)):
        with _autocast(inputs.device, enabled=autocast):
            outputs.append(model(inputs[start:start + max(batch_size, 64)]).float())
    return torch.cat(outputs)


def _create_optimizer(model: nn.Module, options: TrainingOptions) -> torch.optim.Optimizer:
    parameters = model.parameters()
    if options.optimizer == "sgd":
        return torch.optim.SGD(parameters, lr=options.learning_rate, momentum=0.9,
                               weight_decay=options.weight_decay)
    if options.optimizer == "adamw":
        return torch.optim.AdamW(parameters, lr=options.learning_rate,
                                 weight_decay=options.weight_decay)
    return torch.optim.Adam(parameters, lr=options.learning_rate, weight_decay=options.weight_decay)


def _autocast(device: torch.device, *, enabled: bool) -> contextlib.AbstractContextManager[None]:
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def resolve_device(name: str) -> torch.device:
    """Turn ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps`` into an available device.

    Raises:
        DeviceError: The name is invalid or the device does not exist on this machine.
    """
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DeviceError(f"device={name!r} is invalid. Use auto, cpu, cuda, cuda:N or mps.") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device={name!r} requested but CUDA is not available here. "
                             f"Use --device cpu or --device auto.")
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index >= torch.cuda.device_count():
            raise DeviceError(f"device={name!r} does not exist: this machine has "
                             f"{torch.cuda.device_count()} GPU(s), cuda:0 to "
                             f"cuda:{torch.cuda.device_count() - 1}.")
        return torch.device("cuda", index)
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceError(f"device={name!r} requested but MPS is not available. Use --device cpu.")
    return device
