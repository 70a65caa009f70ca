"""genre-search: Optuna studies of music-genre classifiers, tracked as nested MLflow runs.

Modules by concept, from the bottom up: :mod:`search.settings` (environment variables),
:mod:`search.config` (studies.yaml), :mod:`search.study` (Optuna storage, sampler, pruner),
:mod:`search.space` (sampling), :mod:`search.data` (dataset to features and splits),
:mod:`search.training` (the training loop), :mod:`search.tracking` (the MLflow bridge),
:mod:`search.objective` (one trial), :mod:`search.runner` (one worker's loop),
:mod:`search.reports` (status tables) and :mod:`search.cli` on top.
"""
