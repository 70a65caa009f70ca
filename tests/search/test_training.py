"""Tests of search.training: drawing k segments per track per epoch."""

from __future__ import annotations

import pytest
import torch

from models import build_model
from search.training import (
    EpochResult,
    TrainingOptions,
    TrialData,
    draw_segments_per_track,
    train_model,
)

# Track index of each segment: track 0 has 5 segments, track 1 has 1, track 2 has 3, and
# the segments of track 2 are not contiguous.
TRACKS = torch.tensor([0, 0, 2, 0, 1, 0, 2, 0, 2], dtype=torch.int64)


def _per_track_counts(indices: torch.Tensor) -> list[int]:
    return torch.bincount(TRACKS[indices], minlength=3).tolist()


def _draw_epochs(seed: int, k: int, n_epochs: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [draw_segments_per_track(TRACKS, k, generator) for _ in range(n_epochs)]


def test_draw_segments_per_track_one_per_track() -> None:
    for drawn in _draw_epochs(seed=0, k=1, n_epochs=5):
        assert _per_track_counts(drawn) == [1, 1, 1]


def test_draw_segments_per_track_caps_short_tracks() -> None:
    # k=2: track 1 has only one segment, so it gives that one.
    for drawn in _draw_epochs(seed=0, k=2, n_epochs=5):
        assert _per_track_counts(drawn) == [2, 1, 2]


def test_draw_segments_per_track_large_k() -> None:
    drawn = _draw_epochs(seed=0, k=100, n_epochs=1)[0]
    assert sorted(drawn.tolist()) == list(range(len(TRACKS)))


def test_draw_segments_per_track_no_duplicates() -> None:
    for drawn in _draw_epochs(seed=1, k=3, n_epochs=5):
        assert len(set(drawn.tolist())) == len(drawn)


def test_draw_segments_per_track_epochs_differ() -> None:
    epochs = _draw_epochs(seed=0, k=1, n_epochs=6)
    distinct = {tuple(sorted(drawn.tolist())) for drawn in epochs}
    # Track 0 alone has 5 choices; six epochs drawing one identical set would be a bug.
    assert len(distinct) > 1


def test_draw_segments_per_track_same_seed_same_draws() -> None:
    first = _draw_epochs(seed=7, k=2, n_epochs=3)
    second = _draw_epochs(seed=7, k=2, n_epochs=3)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


def test_draw_segments_per_track_other_seed_other_draws() -> None:
    first = torch.cat(_draw_epochs(seed=7, k=2, n_epochs=3))
    second = torch.cat(_draw_epochs(seed=8, k=2, n_epochs=3))
    assert not torch.equal(first, second)


def _tiny_data(*, with_tracks: bool = True) -> TrialData:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(24, 1, 16, 20, generator=generator)  # (n, 1, mels, frames)
    y = torch.arange(24) % 2
    # 16 training segments from 4 tracks of 4 segments each.
    train_tracks = torch.arange(16) // 4 if with_tracks else None
    return TrialData(x_train=x[:16], y_train=y[:16], x_valid=x[16:], y_valid=y[16:],
                     valid_tracks=torch.arange(8), mean=torch.zeros(16), std=torch.ones(16),
                     classes=("a", "b"), train_tracks=train_tracks)


def _train(data: TrialData, segments_per_track: int | None, seed: int = 0) -> list[EpochResult]:
    options = TrainingOptions(optimizer="adam", learning_rate=1e-3, weight_decay=0.0,
                              batch_size=4, epochs=3, seed=seed,
                              segments_per_track=segments_per_track)
    # Dropout draws from the global generator, so seed it for the whole run.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build_model("cnn", n_classes=2, n_mels=16, params={"n_conv_layers": 2})
        return train_model(model, data, options, torch.device("cpu"),
                           on_epoch=lambda result: None)


def test_train_model_segments_per_track_is_deterministic() -> None:
    first = [result.train_loss for result in _train(_tiny_data(), segments_per_track=1)]
    second = [result.train_loss for result in _train(_tiny_data(), segments_per_track=1)]
    assert first == second


def test_train_model_segments_per_track_changes_training() -> None:
    every = [result.train_loss for result in _train(_tiny_data(), segments_per_track=None)]
    one = [result.train_loss for result in _train(_tiny_data(), segments_per_track=1)]
    assert every != one


def test_train_model_segments_per_track_needs_train_tracks() -> None:
    with pytest.raises(ValueError, match="train_tracks is None"):
        _train(_tiny_data(with_tracks=False), segments_per_track=1)
