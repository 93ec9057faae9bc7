"""A Hydra sweeper that searches hyperparameters with Optuna's ask-and-tell API.

Why runner's own: hydra-optuna-sweeper 1.3.0 (its last release) requires optuna<3, and optuna
2.10's SQLite storage fails under SQLAlchemy 2.x (which mlflow 3 needs), so a persistent study,
resumed or shared by several processes, could not work; its default max_failure_rate=0 also ended
a whole study at the first diverging trial. This one takes the same search-space syntax (Hydra's
``interval``, ``tag(log, ...)``, ``choice``, ``range``; ``hydra.sweeper.params`` or the command
line), asks Optuna for ``n_trials`` trials, ``n_jobs`` at a time, runs them through the configured
launcher and tells Optuna each job's return value (runner.job.monitored_value: the final
``trainer.monitor`` metric). A trial whose job failed (exit 1: a NaN loss; exit 2: a bad value in
the space) or returned a non-finite value is told as FAIL and the search goes on.
"""
# No `from __future__ import annotations`: Hydra executes plugin modules outside sys.modules, where
# dataclasses cannot resolve string annotations.
import json
import logging
import math
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, Transformer
from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn, configure_log
from hydra.errors import ConfigCompositionException
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

log = logging.getLogger(__name__)

DIRECTIONS = {"minimize": "minimize", "maximize": "maximize", "min": "minimize", "max": "maximize"}


def search_direction(monitor_mode: Any) -> str:
    """``${search_direction:${trainer.monitor_mode}}``: Optuna's word for the monitor's direction."""
    name = str(getattr(monitor_mode, "name", monitor_mode))
    if name not in DIRECTIONS:
        from runner.errors import UserError

        raise UserError(f"trainer.monitor_mode={name} has no search direction; allowed: min, max")
    return DIRECTIONS[name]


OmegaConf.register_new_resolver("search_direction", search_direction, replace=True)


@dataclass
class SearchSweeperConf:
    _target_: str = "hydra_plugins.runner_search.search_sweeper.SearchSweeper"
    direction: str = "minimize"  # conf/hydra/sweeper/search.yaml makes it follow trainer.monitor_mode
    n_trials: int = 20  # trials this command runs (a continued study adds them to its earlier ones)
    n_jobs: int = 1  # trials asked for and launched at a time (a parallel launcher runs them at once)
    storage: Optional[str] = None  # an Optuna storage URL (sqlite:///search.db): the study outlives the command
    study_name: Optional[str] = None
    # Stop with exit 1 once more than this fraction of the command's finished trials failed (1: never).
    max_failure_rate: float = 1.0
    sampler: Dict[str, Any] = field(default_factory=lambda: {"_target_": "optuna.samplers.TPESampler", "seed": 0})
    params: Dict[str, Any] = field(default_factory=dict)  # key: search-space override, as on the command line


ConfigStore.instance().store(group="hydra/sweeper", name="runner_search", node=SearchSweeperConf, provider="runner")


@dataclass
class Dimension:
    """One searched key: its Optuna distribution and the override prefix (``+`` adds a key)."""

    key: str
    prefix: str
    distribution: Any


def distribution_of(override: Override) -> Any:
    """The Optuna distribution of a sweep override: ``interval(a, b)`` a float range (``tag(log,
    ...)``: sampled in log space; ``tag(int, ...)``: integers), ``range(a, b[, step])`` integers
    a, a+step, ... < b, ``choice(...)`` categorical."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    value = override.value()
    if override.is_interval_sweep():
        log_scale = "log" in value.tags
        if "int" in value.tags:
            return IntDistribution(int(value.start), int(value.end), log=log_scale)
        return FloatDistribution(float(value.start), float(value.end), log=log_scale)
    items = list(override.sweep_iterator(transformer=Transformer.encode))
    if override.is_range_sweep() and not value.shuffle and all(isinstance(v, int) for v in items) and items:
        return IntDistribution(items[0], items[-1], step=int(value.step))
    return CategoricalDistribution(items)  # choice(), or a float / shuffled range


def search_space(lines: Sequence[str]) -> tuple[list[Dimension], list[str]]:
    """The searched dimensions and the fixed overrides (given to every trial as they were written)."""
    dimensions: dict[str, Dimension] = {}
    fixed: dict[str, str] = {}
    for override in OverridesParser.create().parse_overrides(list(lines)):
        key = override.key_or_group
        dimensions.pop(key, None)  # a later override of a key wins
        fixed.pop(key, None)
        if override.is_sweep_override():
            prefix = {"ADD": "+", "FORCE_ADD": "++"}.get(override.type.name, "")
            dimensions[key] = Dimension(key, prefix, distribution_of(override))
        else:
            fixed[key] = override.input_line
    return list(dimensions.values()), list(fixed.values())


def as_override_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    return repr(value) if isinstance(value, float) else str(value)


class SearchSweeper(Sweeper):
    def __init__(self, direction: str, n_trials: int, n_jobs: int, storage: Optional[str], study_name: Optional[str],
                 max_failure_rate: float, sampler: Any, params: Optional[DictConfig]) -> None:
        from runner.errors import UserError

        try:
            import optuna
        except ImportError:
            optuna = None
        if optuna is None or int(optuna.__version__.split(".")[0]) < 4:
            found = f"optuna {optuna.__version__} is installed" if optuna else "optuna is not installed"
            raise UserError(f"hydra/sweeper=search needs optuna>=4 ({found}): pip install -e '.[launchers]'")
        if str(direction) not in DIRECTIONS:
            raise UserError(f"hydra.sweeper.direction={direction} is not a direction; allowed: minimize, maximize")
        if n_trials < 1 or n_jobs < 1:
            raise UserError(f"hydra.sweeper.n_trials={n_trials} and hydra.sweeper.n_jobs={n_jobs} must be >= 1")
        if not 0.0 <= max_failure_rate <= 1.0:
            raise UserError(f"hydra.sweeper.max_failure_rate={max_failure_rate} must be in [0, 1]")
        self.direction = DIRECTIONS[str(direction)]
        self.n_trials, self.n_jobs = n_trials, n_jobs
        self.storage, self.study_name = storage, study_name
        self.max_failure_rate = max_failure_rate
        self.sampler = sampler  # instantiated by Hydra from its _target_
        self.params = dict(params or {})
        self.config: DictConfig | None = None
        self.launcher: Any = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(config=config, hydra_context=hydra_context,
                                                                task_function=task_function)

    # -- the study ---------------------------------------------------------------------------

    def open_study(self) -> Any:
        import optuna

        from runner.errors import UserError

        for attempt in range(6):
            try:
                study = optuna.create_study(storage=self.storage, study_name=self.study_name, sampler=self.sampler,
                                            direction=self.direction, load_if_exists=True)
                break
            except Exception as e:  # a bad URL, a locked or unreadable database, a missing driver
                message = str(e).splitlines()[0] if str(e) else "(no message)"
                if attempt < 5 and any(race in message for race in ("already exists", "locked", "UNIQUE constraint")):
                    # Another command creates the same new database this moment (its tables, or holds
                    # SQLite's lock): its work is done in a moment, then this one reads it.
                    time.sleep(0.2 * 2 ** attempt)
                    continue
                raise UserError(f"hydra.sweeper.storage={self.storage}: the study cannot be opened: "
                                f"{type(e).__name__}: {message}") from None
        if [d.name.lower() for d in study.directions] != [self.direction]:
            raise UserError(f"study {study.study_name} in {self.storage} was created to "
                            f"{study.directions[0].name.lower()}, not to {self.direction}: give "
                            f"hydra.sweeper.direction={study.directions[0].name.lower()} or another hydra.sweeper.study_name")
        if study.trials and self.sampler is not None and hasattr(self.sampler, "reseed_rng"):
            # A seeded sampler in a new process would repeat the first process's draws.
            self.sampler.reseed_rng()
            log.info(f"Study {study.study_name} continues with {len(study.trials)} earlier trial(s); "
                     "the sampler is reseeded so that it does not repeat their draws")
        return study

    def sweep(self, arguments: List[str]) -> None:
        from runner.errors import JobFailed, UserError

        assert self.config is not None and self.launcher is not None
        sweep_dir = Path(self.config.hydra.sweep.dir)
        if sweep_dir.is_dir() and any((p / ".hydra").is_dir() for p in sweep_dir.iterdir()):
            raise UserError(f"{sweep_dir} holds a search's trials already; a search goes on through its study: run the "
                            "search again with the same hydra.sweeper.storage and hydra.sweeper.study_name (it "
                            "writes a new sweep folder)")
        dimensions, fixed = search_space([*(f"{k}={v}" for k, v in self.params.items()), *arguments])
        if not dimensions:
            raise UserError("hydra/sweeper=search has nothing to search: give hydra.sweeper.params (as the "
                            "hparams_search presets do) or a range on the command line, such as "
                            "'optim.lr=tag(log, interval(1e-4, 1e-2))'")
        study = self.open_study()
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")  # as Hydra's sweeper: resume=<folder> reads it
        study.set_user_attr("metric", str(self.config.trainer.monitor))
        space = {d.key: d.distribution for d in dimensions}
        log.info(f"Study {study.study_name} ({self.storage or 'in memory'}): {self.n_trials} trial(s), "
                 f"{self.direction} {self.config.trainer.monitor}, over {', '.join(space)}")
        job_idx, finished, failed = 0, 0, 0
        while finished < self.n_trials:
            trials = [study.ask(space) for _ in range(min(self.n_jobs, self.n_trials - finished))]
            overrides = [[*fixed, *(f"{d.prefix}{d.key}={as_override_value(t.params[d.key])}" for d in dimensions)]
                         for t in trials]
            try:
                returns = self.launcher.launch(overrides, initial_job_idx=job_idx)
            except (ConfigCompositionException, OmegaConfBaseException) as e:
                # A value of the space that the config refuses: a failed trial, once the search has
                # begun; on the first trials it is the command's mistake (exit 2 with Hydra's message).
                self.abandon(study, trials, f"its config cannot be composed: {str(e).splitlines()[0]}", sweep_dir)
                if finished == 0:
                    raise
                failed, finished, job_idx = failed + len(trials), finished + len(trials), job_idx + len(trials)
                continue
            except BaseException:  # SIGINT / SIGTERM (SweepInterrupted): no further trial starts
                self.abandon(study, trials, "interrupted", sweep_dir)
                raise
            configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)  # the jobs set theirs
            for trial, ret, job_overrides, job in zip(trials, returns, overrides, range(job_idx, job_idx + len(trials))):
                failed += not self.tell(study, trial, ret, job, job_overrides)
            job_idx, finished = job_idx + len(trials), finished + len(trials)
            if failed / finished > self.max_failure_rate:
                self.write_best(study, sweep_dir)
                log.error(f"{failed} of {finished} trials failed, more than hydra.sweeper.max_failure_rate="
                          f"{self.max_failure_rate}: the search stops")
                raise JobFailed(f"{failed} of {finished} trials failed")
        best = self.write_best(study, sweep_dir)
        if failed == finished:
            log.error(f"none of the {finished} trials of this search completed: see {sweep_dir}/summary.csv")
            raise JobFailed("no trial completed")
        assert best is not None
        log.info(f"Best trial {best['trial']}: {best['metric']}={best['value']} with "
                 f"{' '.join(best['params_overrides'])} ({failed} of {finished} trials of this search failed); "
                 f"written: {sweep_dir / 'best.json'}, {sweep_dir / 'best.yaml'}")

    def abandon(self, study: Any, trials: Sequence[Any], status: str, sweep_dir: Path) -> None:
        """Trials asked for but not run to the end: FAIL, with why as their status."""
        import optuna

        for trial in trials:
            trial.set_user_attr("status", status)
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
        self.write_best(study, sweep_dir)

    def tell(self, study: Any, trial: Any, ret: JobReturn, job: int, overrides: Sequence[str]) -> bool:
        """Tell Optuna the job's value (True) or that the trial failed (False)."""
        import optuna

        run_dir = Path(ret.hydra_cfg.hydra.runtime.output_dir) if ret.hydra_cfg is not None else None
        trial.set_user_attr("job", job)
        trial.set_user_attr("run_dir", str(run_dir) if run_dir else None)
        trial.set_user_attr("overrides", list(overrides))
        try:
            value = float(ret.return_value)  # raises the job's exception where it failed
        except Exception as e:  # JobFailed: the job ended with exit 1 or 2 (its summary.json says why)
            value, error = math.nan, f"{type(e).__name__}: {e}"
        else:
            error = None if math.isfinite(value) else f"its value is {value}"
        summary = read_summary(run_dir)
        trial.set_user_attr("status", summary.get("status"))
        if error is None:
            study.tell(trial, value)
            return True
        trial.set_user_attr("error", summary.get("error") or error)
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        log.warning(f"Trial {trial.number} (job {job}) failed: {summary.get('error') or error}; the search goes on")
        return False

    def write_best(self, study: Any, sweep_dir: Path) -> dict | None:
        """best.json (the study's best trial, its value, overrides and run folder, and the trial counts)
        and best.yaml (that run's composed config) in the sweep folder; None where no trial completed."""
        import optuna

        from runner.runs.files import atomic_write_json, atomic_write_text

        counts: dict[str, int] = {}
        for t in study.get_trials(deepcopy=False):
            counts[t.state.name.lower()] = counts.get(t.state.name.lower(), 0) + 1
        record: dict[str, Any] = {"study_name": study.study_name, "storage": self.storage, "direction": self.direction,
                                  "metric": study.user_attrs.get("metric"), "trials": counts, "best": None}
        completed = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        best = None
        if completed:
            trial = study.best_trial
            best = {"trial": trial.number, "value": trial.value, "metric": record["metric"], "params": trial.params,
                    "params_overrides": [o for o in trial.user_attrs.get("overrides", [])
                                         if o.lstrip("+").split("=", 1)[0] in trial.params],
                    "overrides": trial.user_attrs.get("overrides"), "run_dir": trial.user_attrs.get("run_dir"),
                    "job": trial.user_attrs.get("job")}
            # hydra.mode=RUN: the job's own command line, which may name a preset that sweeps
            best["command"] = " ".join(["python -m runner", *map(shlex.quote, best["overrides"] or []), "hydra.mode=RUN"])
            record["best"] = best
        sweep_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(sweep_dir / "best.json", record)
        saved = Path(best["run_dir"]) / ".hydra" / "config.yaml" if best and best["run_dir"] else None
        if saved is not None and saved.is_file():
            header = (f"# The best trial ({best['trial']}) of study {study.study_name}: {best['metric']}={best['value']}\n"
                      f"# run folder: {best['run_dir']}\n# again, as one run: {best['command']}\n")
            atomic_write_text(sweep_dir / "best.yaml", header + saved.read_text())
        return best


def read_summary(run_dir: Path | None) -> dict:
    if run_dir is None or not (run_dir / "summary.json").is_file():
        return {}
    try:
        return json.loads((run_dir / "summary.json").read_text())
    except ValueError:
        return {}
