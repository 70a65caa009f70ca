"""Compare genre-search with the usual Optuna + MLflow + librosa DataLoader setup.

Both sides run the same study definition with pruning off. By default that is the
``reference`` study of ``bench/reference.yaml``: a small CNN trained on one random 3 s
segment per training track and epoch. Same seeds, trials, epochs and clips; each side
runs in a fresh process. Prints one table of figures and ratios.

    python -m bench.bench_peer                 # 4 trials of 10 epochs on $GENRE_SEARCH_BENCH_DATA
    python -m bench.bench_peer --study gtzan   # studies.yaml's gtzan study, CNN family
    python -m bench.bench_peer --quick         # 2 trials of 1 epoch, for the smoke test
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import optuna
import torch

from bench._common import (
    REFERENCE_FILE,
    REFERENCE_STUDY,
    STUDIES_FILE,
    bench_data_root,
    bench_study,
    current_rss_mib,
    format_table,
    machine_facts,
    peak_rss_mib,
    ratio,
    run_side,
)

SIDES = ("genre-search", "peer")


def main() -> None:
    """Parse arguments and either run one side or orchestrate both and print the table."""
    arguments = _parser().parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if arguments.quick:
        arguments.trials, arguments.epochs = min(arguments.trials, 2), 1
    data = arguments.data or bench_data_root()
    if arguments.side is not None:
        result = _run_one_side(arguments.side, data, arguments)
        Path(arguments.output).write_text(json.dumps(result, indent=1))
        return
    _compare(data, arguments)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--study", default=REFERENCE_STUDY,
                        help=f"study to compare: {REFERENCE_STUDY} (bench/reference.yaml, the "
                             f"default) or an entry of studies.yaml such as gtzan")
    parser.add_argument("--trials", type=int, default=4, help="trials per side (default 4)")
    parser.add_argument("--epochs", type=int, default=10, help="epochs per trial (default 10)")
    parser.add_argument("--peer-workers", type=int, default=2,
                        help="DataLoader worker processes of the peer (default 2)")
    parser.add_argument("--data", type=Path, default=None,
                        help="audio folder [default: $GENRE_SEARCH_BENCH_DATA, "
                             "then $GENRE_SEARCH_TEST_DATA]")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--quick", action="store_true",
                        help="2 trials of 1 epoch: checks that the script runs")
    parser.add_argument("--json", type=Path, default=None, help="also write all figures here")
    parser.add_argument("--side", choices=SIDES, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--output", default=None, help=argparse.SUPPRESS)
    return parser


def _compare(data: Path, arguments: argparse.Namespace) -> None:
    shared = ["--study", arguments.study,
              "--trials", str(arguments.trials), "--epochs", str(arguments.epochs),
              "--peer-workers", str(arguments.peer_workers), "--data", str(data),
              "--device", arguments.device]
    with tempfile.TemporaryDirectory(prefix="bench-peer-") as scratch:
        results = {side: run_side("bench.bench_peer", [*shared, "--side", side],
                                  Path(scratch) / f"{side}.json") for side in SIDES}
    facts = machine_facts()
    print(f"machine: {facts}")
    print(f"study: {arguments.study}, family cnn, no pruner, {arguments.trials} trials x "
          f"{arguments.epochs} epochs, device {arguments.device}, data {data}")
    print(format_table(_rows(results["genre-search"], results["peer"])))
    _print_goals(results["genre-search"], results["peer"])
    if arguments.json is not None:
        arguments.json.write_text(json.dumps({"machine": facts, **results}, indent=1))


def _run_one_side(side: str, data: Path, arguments: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix=f"bench-{side}-") as scratch:
        studies_file = REFERENCE_FILE if arguments.study == REFERENCE_STUDY else STUDIES_FILE
        config = bench_study(Path(scratch), data=data, epochs=arguments.epochs,
                             n_trials=arguments.trials, device=arguments.device,
                             study_name=arguments.study, studies_file=studies_file)
        if side == "peer":
            return _run_peer(config, arguments.peer_workers)
        return _run_genre_search(config)


# ---------------------------------------------------------------------------------------
# genre-search side


def _run_genre_search(config: Any) -> dict[str, Any]:
    from features import load_features, scan_folder
    from search.data import feature_settings, prepare_dataset
    from search.objective import Objective
    from search.study import create_storage, open_study
    from search.tracking import StudyTracker
    from search.training import EpochResult

    device = torch.device(config.device)
    assert config.dataset.path is not None
    tracks = scan_folder(config.dataset.path)
    settings = feature_settings(config)
    cache_dir = config.cache_dir / "features"
    started = time.perf_counter()
    load_features(tracks, settings, cache_dir=cache_dir, device=device)
    cold_seconds = time.perf_counter() - started
    started = time.perf_counter()
    load_features(tracks, settings, cache_dir=cache_dir, device=device)
    warm_seconds = time.perf_counter() - started

    study = open_study(config, storage=create_storage(config.storage))
    tracker = StudyTracker(config, study)
    tracker.check_connection()
    dataset = prepare_dataset(config, device=device)
    tracker.mark_parent_running()
    epochs: list[EpochResult] = []
    rss_after_trial: list[float] = []
    objective = Objective(config, dataset, tracker, device,
                          on_epoch=lambda number, result: epochs.append(result))
    study_started = time.perf_counter()
    study.optimize(objective, n_trials=config.n_trials,
                   callbacks=[lambda study, trial: rss_after_trial.append(current_rss_mib())])
    study_seconds = time.perf_counter() - study_started
    tracker.finish_study(status="FINISHED")

    trial_seconds = [(trial.datetime_complete - trial.datetime_start).total_seconds()
                     for trial in study.trials if trial.datetime_complete is not None]
    tracking = [value for values in objective.tracking_seconds.values() for value in values]
    return {
        "n_clips": len(tracks),
        "cold_extraction_seconds": cold_seconds,
        "warm_extraction_seconds": warm_seconds,
        "study_seconds": study_seconds,
        "trial_seconds": trial_seconds,
        "epoch_seconds": [result.seconds for result in epochs],
        "step_seconds": [result.step_seconds for result in epochs],
        "eval_seconds": [result.eval_seconds for result in epochs],
        "tracking_seconds": tracking,
        "values": [trial.value for trial in study.trials],
        "rss_after_trial_mib": rss_after_trial,
        "peak_rss_mib": peak_rss_mib(),
        "peak_rss_children_mib": 0.0,
    }


# ---------------------------------------------------------------------------------------
# Peer side


def _run_peer(config: Any, num_workers: int) -> dict[str, Any]:
    from bench.peer import run_peer_study
    from features import scan_folder

    assert config.dataset.path is not None
    tracks = scan_folder(config.dataset.path)
    librosa_seconds = _librosa_extraction_seconds([track.path for track in tracks], config)
    study_started = time.perf_counter()
    study, timings = run_peer_study(config, num_workers=num_workers,
                                    device=torch.device(config.device))
    study_seconds = time.perf_counter() - study_started
    return {
        "n_clips": len(tracks),
        "cold_extraction_seconds": librosa_seconds,
        "warm_extraction_seconds": librosa_seconds,
        "study_seconds": study_seconds,
        "trial_seconds": timings.trial_seconds,
        "epoch_seconds": timings.epoch_seconds,
        "step_seconds": timings.step_seconds,
        "eval_seconds": [],
        "tracking_seconds": timings.tracking_seconds,
        "values": [trial.value for trial in study.trials],
        "rss_after_trial_mib": [],
        "peak_rss_mib": peak_rss_mib(),
        "peak_rss_children_mib": peak_rss_mib(children=True),
    }


def _librosa_extraction_seconds(paths: list[Path], config: Any) -> float:
    """Time decoding every clip with librosa and computing all its segments' log-mel."""
    import librosa
    import numpy as np

    from features import segment_waveform

    features = config.features
    sample_rate = config.dataset.sample_rate
    started = time.perf_counter()
    for path in paths:
        waveform, _ = librosa.load(path, sr=sample_rate, mono=True)
        segments = segment_waveform(waveform, segment_samples=round(
            config.dataset.segment_seconds * sample_rate))
        power = librosa.feature.melspectrogram(
            y=segments, sr=sample_rate, n_fft=features.n_fft, hop_length=features.hop_length,
            n_mels=features.n_mels, fmin=features.f_min, fmax=features.f_max,
        )
        np.asarray(librosa.power_to_db(power, ref=1.0, amin=1e-10, top_db=None), np.float16)
    return time.perf_counter() - started


# ---------------------------------------------------------------------------------------
# Report


def _rows(ours: dict[str, Any], peer: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    def row(name: str, mine: float, theirs: float, unit: str, *, higher_is_better: bool
            ) -> tuple[str, str, str, str]:
        better = ratio(mine, theirs) if higher_is_better else ratio(theirs, mine)
        return (name, f"{mine:.3g} {unit}", f"{theirs:.3g} {unit}", f"{better:.2f}x")

    return [
        row("trials per hour", _per_hour(ours), _per_hour(peer), "", higher_is_better=True),
        row("wall time per trial", _mean(ours["trial_seconds"]), _mean(peer["trial_seconds"]),
            "s", higher_is_better=False),
        row("wall time per epoch", _mean(ours["epoch_seconds"]), _mean(peer["epoch_seconds"]),
            "s", higher_is_better=False),
        row("forward+backward share of trial", 100 * _step_share(ours), 100 * _step_share(peer),
            "%", higher_is_better=True),
        row("tracking+storage per epoch", 1000 * _mean(ours["tracking_seconds"]),
            1000 * _mean(peer["tracking_seconds"]), "ms", higher_is_better=False),
        row("tracking+storage share of epoch", 100 * _tracking_share(ours),
            100 * _tracking_share(peer), "%", higher_is_better=False),
        row("cold extraction (vs librosa)", _clips_per_second(ours, "cold"),
            _clips_per_second(peer, "cold"), "clips/s", higher_is_better=True),
        row("warm extraction (vs librosa)", _clips_per_second(ours, "warm"),
            _clips_per_second(peer, "warm"), "clips/s", higher_is_better=True),
        row("peak RSS main process", ours["peak_rss_mib"], peer["peak_rss_mib"], "MiB",
            higher_is_better=False),
        row("peak RSS largest child", ours["peak_rss_children_mib"],
            peer["peak_rss_children_mib"], "MiB", higher_is_better=False),
    ]


def _print_goals(ours: dict[str, Any], peer: dict[str, Any]) -> None:
    goals = [
        ("trials per hour >= 2x the peer", ratio(_per_hour(ours), _per_hour(peer)) >= 2.0),
        ("forward+backward >= 90 % of trial time (warm cache)", _step_share(ours) >= 0.9),
        ("tracking+storage < 2 % of an epoch", _tracking_share(ours) < 0.02),
        ("cold extraction >= 2x librosa per clip",
         ratio(ours["n_clips"] / ours["cold_extraction_seconds"],
               peer["n_clips"] / peer["cold_extraction_seconds"]) >= 2.0),
    ]
    for text, met in goals:
        print(f"goal {'met    ' if met else 'NOT met'}: {text}")
    compute = ratio(sum(ours["step_seconds"]) + sum(ours["eval_seconds"]),
                    sum(ours["trial_seconds"]))
    print(f"genre-search training steps + validation forward: {100 * compute:.1f} % of trial time")
    rss = ours["rss_after_trial_mib"]
    if rss:
        print("genre-search RSS after each trial (MiB): " + ", ".join(f"{v:.0f}" for v in rss))


def _mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else float("nan")


def _per_hour(side: dict[str, Any]) -> float:
    return 3600.0 * len(side["trial_seconds"]) / side["study_seconds"]


def _step_share(side: dict[str, Any]) -> float:
    return ratio(sum(side["step_seconds"]), sum(side["trial_seconds"]))


def _tracking_share(side: dict[str, Any]) -> float:
    return ratio(sum(side["tracking_seconds"]), sum(side["epoch_seconds"]))


def _clips_per_second(side: dict[str, Any], cache_state: str) -> float:
    return ratio(side["n_clips"], side[f"{cache_state}_extraction_seconds"])


if __name__ == "__main__":
    main()
