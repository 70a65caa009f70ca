"""Smoke tests: every benchmark script runs end to end with ``--quick`` on tiny inputs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from features import synthesize_demo_dataset

REPO_ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def _run_bench(
    module: str, *arguments: str, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run(
        [sys.executable, "-m", module, *arguments], cwd=REPO_ROOT, env=environment,
        capture_output=True, text=True, timeout=timeout, check=False,
    )


@pytest.fixture(scope="module")
def tiny_gtzan(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two generated genres of three 7 s tracks at 22050 Hz, laid out like GTZAN."""
    root = tmp_path_factory.mktemp("tiny-gtzan")
    return synthesize_demo_dataset(root, n_genres=2, tracks_per_genre=3, seconds=7.0,
                                   sample_rate=22050, seed=0)


def test_bench_peer_quick_prints_ratios(tiny_gtzan: Path) -> None:
    completed = _run_bench("bench.bench_peer", "--quick", "--data", str(tiny_gtzan))
    # The script exits cleanly and prints the comparison table with its goal lines.
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "trials per hour" in completed.stdout
    assert "goal" in completed.stdout


def test_bench_pruning_quick_prints_epochs() -> None:
    completed = _run_bench("bench.bench_pruning", "--quick")
    # Both runs (no pruner, pruner) report their epoch counts.
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "no pruner:" in completed.stdout
    assert "epochs with pruner / without" in completed.stdout


def test_bench_scale_quick_reports_memory() -> None:
    completed = _run_bench("bench.bench_scale", "--quick")
    # The extraction child reports its peak memory, and the generated audio is deleted.
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "peak RSS of the extracting worker" in completed.stdout


def test_bench_gpu_quick_without_gpu_skips_cleanly() -> None:
    completed = _run_bench("bench.bench_gpu", "--quick", timeout=120)
    # Without CUDA the GPU script prints a notice and exits 0, so CI on CPU stays green.
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "GPU" in completed.stdout
