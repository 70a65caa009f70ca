"""Fast checks of the performance options: step timings, training flags, trials per GPU."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner

from models import build_model
from search import cli
from search.config import StudyConfig
from search.training import TrainingOptions, TrialData, train_model
from search.workers import LaunchError, plan_gpu_workers

REPO_ROOT = Path(__file__).resolve().parents[2]


def _tiny_data() -> TrialData:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(24, 1, 16, 20, generator=generator)  # (n, 1, mels, frames)
    y = torch.arange(24) % 2
    return TrialData(x_train=x[:16], y_train=y[:16], x_valid=x[16:], y_valid=y[16:],
                     valid_tracks=torch.arange(8), mean=torch.zeros(16), std=torch.ones(16),
                     classes=("a", "b"))


def test_train_model_records_step_and_eval_seconds() -> None:
    model = build_model("cnn", n_classes=2, n_mels=16, params={"n_conv_layers": 2})
    options = TrainingOptions(optimizer="adam", learning_rate=1e-3, weight_decay=0.0,
                              batch_size=8, epochs=2, seed=0)
    results = train_model(model, _tiny_data(), options, torch.device("cpu"),
                          on_epoch=lambda result: None)
    for result in results:
        # Step time is measured and is part of the epoch's wall time.
        assert 0.0 < result.step_seconds <= result.seconds
        # The validation pass is timed separately and also fits inside the epoch.
        assert 0.0 < result.eval_seconds <= result.seconds


def test_plan_gpu_workers_several_per_gpu() -> None:
    plans = plan_gpu_workers([0, 3], trials_per_gpu=2)
    # Two workers see GPU 0 and two see GPU 3, each as its only device.
    assert [plan.env["CUDA_VISIBLE_DEVICES"] for plan in plans] == ["0", "0", "3", "3"]
    # Labels tell the workers on one GPU apart.
    assert [plan.label for plan in plans] == ["gpu 0.0", "gpu 0.1", "gpu 3.0", "gpu 3.1"]
    # Worker indices stay unique across all GPUs.
    assert [plan.index for plan in plans] == [0, 1, 2, 3]


def test_plan_gpu_workers_rejects_zero_per_gpu() -> None:
    with pytest.raises(LaunchError, match="--trials-per-gpu 0"):
        plan_gpu_workers([0], trials_per_gpu=0)


def test_launch_trials_per_gpu_needs_gpus() -> None:
    result = CliRunner().invoke(cli.main, ["launch", "demo", "--config",
                                           str(REPO_ROOT / "studies.yaml"),
                                           "--trials-per-gpu", "2"])
    # Usage errors exit with status 2 and name the missing flag.
    assert result.exit_code == 2
    assert "--gpus" in result.output


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ([], (True, True, False)),
        (["--no-mixed-precision"], (False, False, False)),
        (["--compile"], (True, True, True)),
    ],
)
def test_launch_training_flags_reach_config(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, flags: list[str],
    expected: tuple[bool, bool, bool],
) -> None:
    captured: dict[str, StudyConfig] = {}

    def capture(config: StudyConfig, **_: Any) -> None:
        captured["config"] = config

    # Only the study run is replaced, so the test captures the config the command resolved.
    monkeypatch.setattr(cli, "_run_study", capture)
    # A copy keeps the storage that `launch` checks inside tmp_path.
    config = tmp_path / "studies.yaml"
    shutil.copy(REPO_ROOT / "studies.yaml", config)
    result = CliRunner().invoke(cli.main, ["launch", "demo", "--config", str(config), *flags])
    assert result.exit_code == 0, result.output
    training = captured["config"].training
    # mixed_precision, channels_last and compile follow the flags.
    assert (training.mixed_precision, training.channels_last, training.compile) == expected
