"""Fast tests of worker planning, storage checks and the launch flags (no training)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from search.cli import main
from search.config import ConfigError
from search.runner import WORKER_INDEX_ENV
from search.study import heartbeat_settings
from search.workers import (
    LaunchError,
    LaunchSummary,
    WorkerExit,
    WorkerPlan,
    check_parallel_storage,
    parse_gpu_list,
    plan_cpu_workers,
    plan_gpu_workers,
    read_storage_file,
    worker_command,
)

STUDIES_YAML = """
defaults:
  storage: sqlite:///optuna.db
  tracking_uri: sqlite:///mlflow.db
studies:
  tiny:
    dataset:
      synthetic: {n_genres: 3, tracks_per_genre: 4, seconds: 4.0, seed: 0}
      sample_rate: 8000
      segment_seconds: 1.0
      split: {method: random, valid_fraction: 0.25, seed: 0}
    features: {n_fft: 256, hop_length: 128, n_mels: 16, f_max: 4000.0}
    training: {epochs: 2, num_threads: 1}
    pruner: {name: none}
    sampler: {name: random, seed: 0}
    n_trials: 3
    search_space:
      family: {choices: [cnn]}
      learning_rate: {low: 1.0e-3, high: 3.0e-3, log: true}
      batch_size: {choices: [16]}
      dropout: {low: 0.0, high: 0.1}
      weight_decay: {low: 1.0e-6, high: 1.0e-5, log: true}
      optimizer: {choices: [adam]}
      architectures:
        cnn:
          n_conv_layers: {low: 2, high: 2}
          base_channels: {choices: [4]}
          kernel_size: {choices: [3]}
"""


def test_parse_gpu_list_all() -> None:
    # `all` means every visible GPU, in order.
    assert parse_gpu_list("all", 3) == [0, 1, 2]


def test_parse_gpu_list_indices() -> None:
    # Spaces around indices are accepted.
    assert parse_gpu_list(" 0, 2", 4) == [0, 2]


@pytest.mark.parametrize(("spec", "n_gpus", "expected"), [
    ("all", 0, "no CUDA device"),
    ("0,x", 2, "is invalid"),
    ("1,1", 2, "repeats a GPU"),
    ("0,3", 2, "GPU 3 does not exist"),
])
def test_parse_gpu_list_rejects(spec: str, n_gpus: int, expected: str) -> None:
    with pytest.raises(LaunchError, match=expected):
        parse_gpu_list(spec, n_gpus)


def test_plan_gpu_workers_pins_one_gpu() -> None:
    plans = plan_gpu_workers([1, 3])
    # Each worker sees only its physical GPU ...
    assert [plan.env["CUDA_VISIBLE_DEVICES"] for plan in plans] == ["1", "3"]
    # ... as cuda:0 inside the process.
    assert {plan.device for plan in plans} == {"cuda:0"}
    # The label names the physical index for the logs.
    assert plans[1].label == "gpu 3"


def test_plan_cpu_workers_divides_cores() -> None:
    plans = plan_cpu_workers(2, threads=None, n_cores=8)
    # 8 cores over 2 workers give 4 torch threads each.
    assert plans[0].env["GENRE_SEARCH_NUM_THREADS"] == "4"
    # OpenMP gets the same limit.
    assert plans[0].env["OMP_NUM_THREADS"] == "4"


def test_plan_cpu_workers_at_least_one_thread() -> None:
    plans = plan_cpu_workers(4, threads=None, n_cores=2)
    # More workers than cores still get one thread each.
    assert {plan.env["GENRE_SEARCH_NUM_THREADS"] for plan in plans} == {"1"}


def test_plan_cpu_workers_indices() -> None:
    plans = plan_cpu_workers(3, threads=2, n_cores=2)
    # Every worker gets its own index, which offsets its sampler seed.
    assert [plan.env[WORKER_INDEX_ENV] for plan in plans] == ["0", "1", "2"]
    # An explicit --threads wins over the division.
    assert plans[0].env["GENRE_SEARCH_NUM_THREADS"] == "2"


def test_worker_command_runs_worker_module() -> None:
    plan = WorkerPlan(index=0, device="cpu", label="cpu 0")
    command = worker_command("demo", plan, extra_args=["--config", "studies.yaml"])
    # The worker is `python -m search worker STUDY --device DEVICE ...`.
    assert command[1:7] == ["-m", "search", "worker", "demo", "--device", "cpu"]


def test_check_parallel_storage_rejects_sqlite() -> None:
    with pytest.raises(LaunchError, match="Use PostgreSQL"):
        check_parallel_storage("sqlite:////tmp/optuna.db", n_workers=2)


def test_check_parallel_storage_accepts() -> None:
    # One worker on SQLite and several on PostgreSQL are fine; nothing is raised.
    check_parallel_storage("sqlite:////tmp/optuna.db", n_workers=1)
    check_parallel_storage("postgresql+psycopg://user@host/optuna", n_workers=4)


def test_check_parallel_storage_hides_password() -> None:
    with pytest.raises(LaunchError) as caught:
        check_parallel_storage("sqlite:////tmp/optuna.db", n_workers=3)
    # The message names the storage but the SQLite URL has no password to hide.
    assert "sqlite:////tmp/optuna.db" in str(caught.value)


def test_read_storage_file_first_line(tmp_path: Path) -> None:
    path = tmp_path / "storage-url"
    path.write_text("postgresql+psycopg://genre:secret@db/optuna\n# comment\n")
    # Only the first line is the URL.
    assert read_storage_file(path) == "postgresql+psycopg://genre:secret@db/optuna"


def test_read_storage_file_empty(tmp_path: Path) -> None:
    path = tmp_path / "storage-url"
    path.write_text("\n")
    with pytest.raises(LaunchError, match="is empty"):
        read_storage_file(path)


def test_read_storage_file_missing(tmp_path: Path) -> None:
    with pytest.raises(LaunchError, match="cannot be read"):
        read_storage_file(tmp_path / "absent")


def test_heartbeat_settings_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GENRE_SEARCH_HEARTBEAT_INTERVAL", "1")
    monkeypatch.setenv("GENRE_SEARCH_GRACE_PERIOD", "5")
    assert heartbeat_settings() == (1, 5)


@pytest.mark.parametrize(("interval", "grace", "expected"), [
    ("0", "5", "is invalid"),
    ("abc", "5", "is invalid"),
    ("5", "5", "must be longer"),
])
def test_heartbeat_settings_rejects(monkeypatch: pytest.MonkeyPatch, interval: str,
                                    grace: str, expected: str) -> None:
    monkeypatch.setenv("GENRE_SEARCH_HEARTBEAT_INTERVAL", interval)
    monkeypatch.setenv("GENRE_SEARCH_GRACE_PERIOD", grace)
    with pytest.raises(ConfigError, match=expected):
        heartbeat_settings()


def _summary(codes: list[int], *, interrupted_by: int | None, n_finished: int) -> LaunchSummary:
    plan = WorkerPlan(index=0, device="cpu", label="cpu 0")
    return LaunchSummary(exits=[WorkerExit(plan, code, 1.0) for code in codes],
                         interrupted_by=interrupted_by, n_finished=n_finished, target=4)


def test_launch_summary_success() -> None:
    summary = _summary([0, 0], interrupted_by=None, n_finished=4)
    assert summary.exit_code == 0
    assert summary.parent_status == "FINISHED"


def test_launch_summary_worker_failed() -> None:
    summary = _summary([0, 1], interrupted_by=None, n_finished=3)
    # A failed worker makes launch fail ...
    assert summary.exit_code == 1
    # ... and the parent run FAILED when the target was missed.
    assert summary.parent_status == "FAILED"


def test_launch_summary_interrupted() -> None:
    summary = _summary([143, 143], interrupted_by=15, n_finished=1)
    assert summary.exit_code == 143
    assert summary.parent_status == "KILLED"


@pytest.fixture()
def studies_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "studies.yaml").write_text(STUDIES_YAML)
    monkeypatch.chdir(tmp_path)
    for name in ("GENRE_SEARCH_STORAGE", "GENRE_SEARCH_STORAGE_FILE", "GENRE_SEARCH_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path


def test_launch_workers_and_gpus_conflict(studies_dir: Path) -> None:
    result = CliRunner().invoke(main, ["launch", "tiny", "--workers", "2", "--gpus", "all"])
    # A usage error exits 2 ...
    assert result.exit_code == 2
    # ... and names both flags.
    assert "--workers and --gpus" in result.output


def test_launch_threads_needs_workers(studies_dir: Path) -> None:
    result = CliRunner().invoke(main, ["launch", "tiny", "--threads", "2"])
    assert result.exit_code == 2
    assert "--threads applies to --workers" in result.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_launch_gpus_without_cuda(studies_dir: Path) -> None:
    result = CliRunner().invoke(main, ["launch", "tiny", "--gpus", "all"])
    assert result.exit_code == 2
    assert "no CUDA device" in result.output


def test_launch_workers_on_sqlite_rejected(studies_dir: Path) -> None:
    result = CliRunner().invoke(main, ["launch", "tiny", "--workers", "2"])
    # Several workers on SQLite are rejected before anything starts ...
    assert result.exit_code == 2
    assert "PostgreSQL" in result.output
    # ... so no database file was created.
    assert not (studies_dir / "optuna.db").exists()


def test_storage_file_used_by_cli(studies_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url_file = studies_dir / "storage-url"
    url_file.write_text(f"sqlite:///{studies_dir / 'from-file.db'}\n")
    monkeypatch.setenv("GENRE_SEARCH_STORAGE_FILE", str(url_file))
    result = CliRunner().invoke(main, ["launch", "tiny", "--workers", "2"])
    # The URL read from the file is the one checked (and rejected) for several workers.
    assert "from-file.db" in result.output
