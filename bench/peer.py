"""The usual way to write this search, as the baseline that genre-search is measured against.

A torch ``Dataset`` decodes a random 3 s crop of a file with librosa and computes its
log-mel spectrogram in ``__getitem__``. A ``DataLoader`` with worker processes batches
the items. ``optuna_integration.MLflowCallback`` opens one MLflow run per trial, and the
objective logs each epoch's metrics inside it with ``mlflow.log_metrics``. Models,
optimizers, search space, sampler, seeds and epochs are the ones genre-search uses, so
the two differ only in how data and tracking are handled.

A training track yields as many random crops per epoch as genre-search trains on: one per
whole segment it contains (a 20 s clip gives 6 crops per epoch), or
``training.segments_per_track`` of them when the study sets it. With
``segments_per_track: 1`` this is the usual form: one random 3 s crop of every training
track per epoch. Validation uses the same fixed, non-overlapping segments as genre-search.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import librosa
import mlflow
import numpy as np
import optuna
import soundfile
import torch
from optuna_integration import MLflowCallback
from torch import nn
from torch.utils.data import DataLoader, Dataset

from features import Track, scan_folder, split_random
from models import build_model
from search.config import StudyConfig
from search.space import suggest_params
from search.study import create_pruner, create_sampler

_logger = logging.getLogger(__name__)

AMIN = 1e-10


@dataclass(frozen=True)
class PeerItem:
    """One example: a file, its class and a fixed start in seconds (``None``: random crop)."""

    path: Path
    label: int
    duration: float
    offset: float | None


class LibrosaCropDataset(Dataset[tuple[torch.Tensor, int]]):
    """Decode one crop and compute its log-mel with librosa each time an item is read."""

    def __init__(self, items: list[PeerItem], config: StudyConfig) -> None:
        self.items = items
        self.config = config
        self.segment_seconds = config.dataset.segment_seconds
        self.rng = np.random.default_rng()

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        item = self.items[index]
        offset = item.offset
        if offset is None:
            offset = float(self.rng.uniform(0.0, item.duration - self.segment_seconds))
        return log_mel_crop(item.path, offset, self.config), item.label


def log_mel_crop(path: Path, offset: float, config: StudyConfig) -> torch.Tensor:
    """Return the standardized (1, n_mels, n_frames) log-mel of a crop, computed with librosa."""
    sample_rate = config.dataset.sample_rate
    n_samples = round(config.dataset.segment_seconds * sample_rate)
    waveform, _ = librosa.load(path, sr=sample_rate, mono=True, offset=offset,
                               duration=config.dataset.segment_seconds)
    waveform = librosa.util.fix_length(waveform, size=n_samples)
    features = config.features
    power = librosa.feature.melspectrogram(
        y=waveform, sr=sample_rate, n_fft=features.n_fft, hop_length=features.hop_length,
        n_mels=features.n_mels, fmin=features.f_min, fmax=features.f_max,
    )
    log_mel = librosa.power_to_db(power, ref=1.0, amin=AMIN, top_db=None)
    log_mel = (log_mel - log_mel.mean()) / (log_mel.std() + 1e-3)
    return torch.from_numpy(log_mel.astype(np.float32)).unsqueeze(0)  # (1, mels, frames)


def _seed_worker(worker_id: int) -> None:
    info = torch.utils.data.get_worker_info()
    assert info is not None
    info.dataset.rng = np.random.default_rng(info.seed % 2**32)  # type: ignore[attr-defined]


def build_items(config: StudyConfig) -> tuple[list[PeerItem], list[PeerItem], list[str]]:
    """Return training items (random crops), validation items (fixed segments) and classes.

    The split is the one genre-search makes: ``split_random`` on the same tracks, fractions
    and seed. Each training track gives one random crop per whole segment, capped at
    ``config.training.segments_per_track`` when that is set.
    """
    assert config.dataset.path is not None
    tracks = sorted(scan_folder(config.dataset.path), key=lambda track: track.track_id)
    split = config.dataset.split
    splits = split_random(tracks, valid_fraction=split.valid_fraction,
                          test_fraction=split.test_fraction, seed=split.seed)
    classes = sorted({track.label for track in tracks})
    by_id = {track.track_id: track for track in tracks}
    segment = config.dataset.segment_seconds
    per_track = config.training.segments_per_track
    train: list[PeerItem] = []
    valid: list[PeerItem] = []
    for track_id in splits.train:
        track = by_id[track_id]
        duration = soundfile.info(str(track.path)).duration
        n_segments = int(duration // segment)
        n_crops = n_segments if per_track is None else min(per_track, n_segments)
        train += [_item(track, classes, duration, None)] * n_crops
    for track_id in splits.valid:
        track = by_id[track_id]
        duration = soundfile.info(str(track.path)).duration
        valid += [_item(track, classes, duration, index * segment)
                  for index in range(int(duration // segment))]
    return train, valid, classes


def _item(track: Track, classes: list[str], duration: float, offset: float | None) -> PeerItem:
    return PeerItem(path=track.path, label=classes.index(track.label), duration=duration,
                    offset=offset)


@dataclass
class PeerTimings:
    """Per-epoch clocks of the peer, in seconds, for the benchmark report."""

    epoch_seconds: list[float] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)
    tracking_seconds: list[float] = field(default_factory=list)
    trial_seconds: list[float] = field(default_factory=list)


class PeerObjective:
    """The Optuna objective of the peer: DataLoader per trial, metrics logged per epoch."""

    def __init__(self, config: StudyConfig, *, num_workers: int, callback: MLflowCallback,
                 device: torch.device) -> None:
        self.config = config
        self.num_workers = num_workers
        self.device = device
        self.train_items, self.valid_items, self.classes = build_items(config)
        self.timings = PeerTimings()
        # MLflowCallback's decorator opens the trial's run, so mlflow.log_metrics inside
        # the objective lands in it.
        self.run = callback.track_in_mlflow()(self._objective)

    def _loader(self, items: list[PeerItem], batch_size: int, *, shuffle: bool,
                seed: int) -> DataLoader[tuple[torch.Tensor, int]]:
        generator = torch.Generator().manual_seed(seed)
        return DataLoader(
            LibrosaCropDataset(items, self.config), batch_size=batch_size, shuffle=shuffle,
            num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
            worker_init_fn=_seed_worker, generator=generator,
        )

    def _objective(self, trial: optuna.Trial) -> float:
        started = time.perf_counter()
        params = suggest_params(trial, self.config.search_space)
        seed = self.config.training.seed + trial.number
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = build_model(params.family, n_classes=len(self.classes),
                                n_mels=self.config.features.n_mels, params=params.model_params())
        model = model.to(self.device)
        optimizer = _optimizer(model, params.common)
        batch_size = int(params.common["batch_size"])
        train_loader = self._loader(self.train_items, batch_size, shuffle=True, seed=seed)
        valid_loader = self._loader(self.valid_items, max(batch_size, 64), shuffle=False,
                                    seed=seed)
        best = math.inf
        try:
            for epoch in range(1, self.config.training.epochs + 1):
                best = min(best, self._epoch(trial, epoch, model, optimizer, train_loader,
                                             valid_loader))
        finally:
            self.timings.trial_seconds.append(time.perf_counter() - started)
        return best

    def _epoch(self, trial: optuna.Trial, epoch: int, model: nn.Module,
               optimizer: torch.optim.Optimizer, train_loader: DataLoader[tuple[torch.Tensor, int]],
               valid_loader: DataLoader[tuple[torch.Tensor, int]]) -> float:
        epoch_started = time.perf_counter()
        train_loss, step_seconds = _train(model, optimizer, train_loader, self.device)
        val_loss, val_accuracy = _validate(model, valid_loader, self.device)
        self.timings.epoch_seconds.append(time.perf_counter() - epoch_started)
        self.timings.step_seconds.append(step_seconds)

        tracking_started = time.perf_counter()
        mlflow.log_metrics({"train_loss": train_loss, "val_loss": val_loss,
                            "val_accuracy": val_accuracy}, step=epoch)
        trial.report(val_loss, step=epoch)
        should_prune = trial.should_prune()
        self.timings.tracking_seconds.append(time.perf_counter() - tracking_started)
        if should_prune:
            raise optuna.TrialPruned(f"pruned at epoch {epoch}")
        return val_loss


def _optimizer(model: nn.Module, common: dict[str, object]) -> torch.optim.Optimizer:
    name = str(common["optimizer"])
    learning_rate = float(common["learning_rate"])  # type: ignore[arg-type]
    weight_decay = float(common["weight_decay"])  # type: ignore[arg-type]
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=learning_rate, momentum=0.9,
                               weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=weight_decay)
    return torch.optim.Adam(model.parameters(), lr=learning_rate, weight_decay=weight_decay)


def _train(model: nn.Module, optimizer: torch.optim.Optimizer,
           loader: DataLoader[tuple[torch.Tensor, int]], device: torch.device
           ) -> tuple[float, float]:
    model.train()
    loss_function = nn.CrossEntropyLoss()
    total, count, step_seconds = 0.0, 0, 0.0
    for inputs, targets in loader:
        inputs, targets = inputs.to(device), targets.to(device)
        step_started = time.perf_counter()
        loss = loss_function(model(inputs), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step_seconds += time.perf_counter() - step_started
        total += loss.item() * len(targets)
        count += len(targets)
    return total / count, step_seconds


@torch.no_grad()
def _validate(model: nn.Module, loader: DataLoader[tuple[torch.Tensor, int]],
              device: torch.device) -> tuple[float, float]:
    model.eval()
    total, correct, count = 0.0, 0, 0
    for inputs, targets in loader:
        inputs, targets = inputs.to(device), targets.to(device)
        logits = model(inputs)
        total += nn.functional.cross_entropy(logits, targets, reduction="sum").item()
        correct += int((logits.argmax(dim=1) == targets).sum())
        count += len(targets)
    return total / count, correct / count


def run_peer_study(config: StudyConfig, *, num_workers: int,
                   device: torch.device | None = None) -> tuple[optuna.Study, PeerTimings]:
    """Run ``config.n_trials`` trials the peer's way; return the study and its clocks."""
    callback = MLflowCallback(tracking_uri=config.tracking_uri, metric_name="val_loss",
                              create_experiment=True, mlflow_kwargs={"nested": False})
    study = optuna.create_study(
        study_name=f"{config.name}-peer", storage=config.storage,
        sampler=create_sampler(config.sampler), pruner=create_pruner(config.pruner),
        direction=config.direction,
    )
    objective = PeerObjective(config, num_workers=num_workers, callback=callback,
                              device=device or torch.device("cpu"))
    study.optimize(objective.run, n_trials=config.n_trials, callbacks=[callback])
    return study, objective.timings
