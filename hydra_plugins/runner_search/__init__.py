"""``hydra/sweeper=search``: hyperparameter search with Optuna (search_sweeper.py).

runner's own sweeper, built on Optuna's public ask-and-tell API, instead of hydra-optuna-sweeper:
1.3.0, the last release, requires optuna<3, and optuna 2.10's SQLite storage fails under the
SQLAlchemy 2.x that mlflow 3 installs, so a persistent (resumable, shared) study could not work.
Hydra finds sweepers in the ``hydra_plugins`` package only.
"""
