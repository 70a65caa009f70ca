"""Helpers shared by the benchmark scripts: data location, study setup, machine facts."""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from search.config import (
    Overrides,
    ParamSpec,
    PrunerConfig,
    StudyConfig,
    apply_overrides,
    load_studies,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
STUDIES_FILE = REPO_ROOT / "studies.yaml"
DATA_VARIABLES = ("GENRE_SEARCH_BENCH_DATA", "GENRE_SEARCH_TEST_DATA")
# The peer comparison's study: a small CNN on one random segment per track and epoch.
REFERENCE_FILE = REPO_ROOT / "bench" / "reference.yaml"
REFERENCE_STUDY = "reference"


def bench_data_root() -> Path:
    """Return the folder of real clips named by ``GENRE_SEARCH_BENCH_DATA`` or ``..._TEST_DATA``.

    Either variable may name the gtzan-mini folder itself or a folder that contains it.

    Raises:
        SystemExit: Neither variable is set, or the folder has no genre sub-folders.
    """
    for variable in DATA_VARIABLES:
        value = os.environ.get(variable)
        if not value:
            continue
        base = Path(value).expanduser()
        root = base / "gtzan-mini" if (base / "gtzan-mini").is_dir() else base
        if not any(child.is_dir() for child in root.iterdir()):
            raise SystemExit(f"{variable}={value!r} has no genre sub-folders; point it at "
                             f"a folder such as gtzan-mini/ with blues/, classical/, ...")
        return root
    raise SystemExit(f"no benchmark data: set {DATA_VARIABLES[0]} (or {DATA_VARIABLES[1]}) "
                     f"to a folder of audio in genre sub-folders, e.g. gtzan-mini/")


def bench_study(
    work_dir: Path,
    *,
    data: Path | None,
    epochs: int,
    n_trials: int,
    family: str | None = "cnn",
    pruner: bool = False,
    study_name: str = REFERENCE_STUDY,
    device: str = "cpu",
    studies_file: Path = REFERENCE_FILE,
) -> StudyConfig:
    """Load the reference study and point its storage, tracking and cache into ``work_dir``.

    Args:
        work_dir: Scratch folder for the SQLite files and the feature cache.
        data: Folder of audio in genre sub-folders, or ``None`` for the study's own data.
        epochs: Epochs per trial.
        n_trials: Trials of the benchmark study.
        family: Fix the model family to this one, or ``None`` to search the study's families.
        pruner: Keep the study's pruner; ``False`` replaces it with no pruning so every
            trial trains the same number of epochs.
        study_name: Entry of ``studies_file`` to start from.
        device: Device of the trials, ``cpu`` or ``cuda``.
        studies_file: Studies file that contains ``study_name``; the bench-only
            ``bench/reference.yaml`` by default, ``STUDIES_FILE`` for the shipped studies.
    """
    overrides = Overrides(
        n_trials=n_trials, device=device, data=data,
        storage=f"sqlite:///{work_dir / 'optuna.db'}",
        tracking_uri=f"sqlite:///{work_dir / 'mlflow.db'}",
        cache_dir=work_dir / "cache",
    )
    config = apply_overrides(load_studies(studies_file).get(study_name), overrides,
                             base_dir=studies_file.parent)
    config = replace(config, training=replace(config.training, epochs=epochs))
    if family is not None:
        fixed = ParamSpec(name=config.search_space.family.name, kind="fixed", value=family)
        config = replace(config, search_space=replace(config.search_space, family=fixed))
    if not pruner:
        config = replace(config, pruner=PrunerConfig(name="none", options={}))
    return config


def peak_rss_mib(*, children: bool = False) -> float:
    """Return the peak resident set size of this process (or of its largest child), in MiB."""
    target = resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF
    kib = resource.getrusage(target).ru_maxrss  # KiB on Linux
    return kib / 1024.0


def current_rss_mib() -> float:
    """Return the resident set size of this process now, in MiB (Linux ``/proc``)."""
    fields = Path("/proc/self/statm").read_text().split()
    return int(fields[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def machine_facts() -> dict[str, Any]:
    """Return the CPU model, core count, memory, load average and library versions."""
    cpu_model = "unknown"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "cpu": cpu_model,
        "nproc": os.cpu_count(),
        "memory_gib": round(memory_gib, 1),
        "load_average": [round(value, 2) for value in os.getloadavg()],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def run_side(module: str, arguments: list[str], output: Path) -> dict[str, Any]:
    """Run ``python -m module arguments --output output`` in a fresh process; return its JSON.

    Each side of a comparison runs in its own process, so peak memory and thread pools of
    one side never count against the other.
    """
    command = [sys.executable, "-m", module, *arguments, "--output", str(output)]
    subprocess.run(command, check=True, cwd=REPO_ROOT)
    result: dict[str, Any] = json.loads(output.read_text())
    return result


def ratio(numerator: float, denominator: float) -> float:
    """Return ``numerator / denominator``, or NaN when the denominator is zero."""
    return numerator / denominator if denominator else float("nan")


def format_table(rows: list[tuple[str, str, str, str]]) -> str:
    """Format (figure, genre-search, peer, ratio) rows as a fixed-width text table."""
    header = ("figure", "genre-search", "peer", "ratio")
    widths = [max(len(row[index]) for row in [header, *rows]) for index in range(4)]
    lines = ["  ".join(cell.ljust(widths[index]) for index, cell in enumerate(row))
             for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)
