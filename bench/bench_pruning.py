"""Run one study with and without its pruner: epochs trained and best value of each.

    python -m bench.bench_pruning                 # demo study, 16 trials, studies.yaml epochs
    python -m bench.bench_pruning --study gtzan   # real clips from $GENRE_SEARCH_BENCH_DATA
    python -m bench.bench_pruning --epochs 12 --pruner median \
        --pruner-option n_startup_trials=2 --pruner-option n_warmup_steps=1
    python -m bench.bench_pruning --quick         # 3 trials of 2 epochs, for the smoke test

Without ``--pruner`` the study's own pruner is used; ``--pruner-option`` replaces that
pruner's options (integers only, as Optuna's pruners take them).
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import optuna

from bench._common import STUDIES_FILE, bench_data_root, bench_study, machine_facts, ratio
from search.config import PrunerConfig, load_studies


def main() -> None:
    """Run the study twice, pruner off then on, and print epochs, best value and time."""
    arguments = _parser().parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    epochs = arguments.epochs or load_studies(STUDIES_FILE).get(arguments.study).training.epochs
    trials = arguments.trials
    if arguments.quick:
        trials, epochs = 3, 2
    print(f"machine: {machine_facts()}")
    results = {pruned: _run(arguments, trials=trials, epochs=epochs, pruner=pruned)
               for pruned in (False, True)}
    without, with_pruner = results[False], results[True]
    print(f"study {arguments.study}: {trials} trials x {epochs} epochs, pruner "
          f"{with_pruner['pruner']}")
    for name, result in (("no pruner", without), ("pruner", with_pruner)):
        print(f"{name:>10}: {result['epochs']:4d} epochs, {result['pruned']:2d} trials pruned, "
              f"best value {result['best']:.4f}, {result['seconds']:.0f} s")
    epoch_share = ratio(with_pruner["epochs"], without["epochs"])
    sign = 1.0 if with_pruner["direction"] == "minimize" else -1.0
    worse_by = sign * ratio(with_pruner["best"] - without["best"], abs(without["best"]))
    print(f"epochs with pruner / without: {epoch_share:.2f}; best value with pruner is "
          f"{100 * worse_by:+.1f} % worse (negative: better)")
    met = epoch_share <= 0.5 and worse_by <= 0.05
    print(f"goal {'met' if met else 'NOT met'}: at most half the epochs for a best value "
          f"within 5 %")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--study", default="demo", help="studies.yaml entry (default demo)")
    parser.add_argument("--trials", type=int, default=16, help="trials per run (default 16)")
    parser.add_argument("--epochs", type=int, default=None,
                        help="epochs per trial [default: the study's training.epochs]")
    parser.add_argument("--data", type=Path, default=None,
                        help="audio folder for studies with a dataset path [default: "
                             "$GENRE_SEARCH_BENCH_DATA, then $GENRE_SEARCH_TEST_DATA]")
    parser.add_argument("--pruner", choices=("median", "successive_halving", "hyperband"),
                        default=None, help="pruner of the pruned run [default: the study's]")
    parser.add_argument("--pruner-option", action="append", default=[], metavar="KEY=VALUE",
                        help="integer option of --pruner, e.g. n_warmup_steps=1; repeatable")
    parser.add_argument("--quick", action="store_true", help="3 trials of 2 epochs")
    return parser


def _pruner_config(arguments: argparse.Namespace, study: PrunerConfig) -> PrunerConfig:
    """Return the pruner of the pruned run: the study's, or the one the flags name."""
    if arguments.pruner is None and not arguments.pruner_option:
        return study
    options: dict[str, int] = {}
    for text in arguments.pruner_option:
        key, separator, value = text.partition("=")
        if not separator or not value.lstrip("-").isdigit():
            raise SystemExit(f"--pruner-option {text!r} is not KEY=INTEGER. "
                             f"Write it as e.g. n_warmup_steps=1.")
        options[key] = int(value)
    return PrunerConfig(name=arguments.pruner or study.name, options=options)


def _run(arguments: argparse.Namespace, *, trials: int, epochs: int,
         pruner: bool) -> dict[str, Any]:
    from search.runner import run_worker
    from search.study import create_storage

    with tempfile.TemporaryDirectory(prefix="bench-pruning-") as scratch:
        config = bench_study(Path(scratch), data=_data(arguments), epochs=epochs,
                             n_trials=trials, family=None, pruner=pruner,
                             study_name=arguments.study, studies_file=STUDIES_FILE)
        if pruner:
            config = replace(config, pruner=_quick_pruner(
                _pruner_config(arguments, config.pruner), quick=arguments.quick))
        started = time.perf_counter()
        result = run_worker(config)
        seconds = time.perf_counter() - started
        study = optuna.load_study(study_name=config.name,
                                  storage=create_storage(config.storage, heartbeat=False))
        finished = [trial for trial in study.trials if trial.state.is_finished()]
        return {
            "pruner": f"{config.pruner.name} {dict(config.pruner.options)}",
            "direction": config.direction,
            "epochs": sum(len(trial.intermediate_values) for trial in finished),
            "pruned": sum(trial.state == optuna.trial.TrialState.PRUNED for trial in finished),
            "best": result.best_value if result.best_value is not None else float("nan"),
            "seconds": seconds,
        }


def _quick_pruner(pruner: PrunerConfig, *, quick: bool) -> PrunerConfig:
    # Three trials of two epochs: let the median pruner act from the second trial on.
    if not quick or pruner.name != "median":
        return pruner
    return replace(pruner, options={**pruner.options, "n_startup_trials": 1,
                                    "n_warmup_steps": 0})


def _data(arguments: argparse.Namespace) -> Path | None:
    if arguments.data is not None:
        return arguments.data
    study = load_studies(STUDIES_FILE).get(arguments.study)
    return None if study.dataset.path is None or study.dataset.synthetic else bench_data_root()


if __name__ == "__main__":
    main()
