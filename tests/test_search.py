"""hydra/sweeper=search (hydra_plugins/runner_search/): the direction follows trainer.monitor_mode
unless set; every hparams_search preset composes and its space fits its experiment's config; a
study kept in SQLite goes on in a second command (read back with Optuna's own API); a diverging
trial is recorded failed and the search goes on; best.json / best.yaml agree with the study and the
run folders, and runner.report shows them. The sweeper's own rules (NaN, failure rate, interrupts)
run against a stand-in launcher, in process."""
from __future__ import annotations

import json
import math
import shlex
from pathlib import Path

import optuna
import pytest
from hydra.core.utils import JobReturn, JobStatus
from omegaconf import OmegaConf

from conftest import compose, run_cli
from hydra_plugins.runner_search.search_sweeper import SearchSweeper, search_space
from runner.config.compose import CONF_DIR
from runner.errors import JobFailed, SweepInterrupted

PRESETS = sorted(p.stem for p in (CONF_DIR / "hparams_search").glob("*.yaml"))
WORD = {"min": "minimize", "max": "maximize"}


def mode_of(cfg) -> str:
    return getattr(cfg.trainer.monitor_mode, "name", str(cfg.trainer.monitor_mode))


@pytest.mark.parametrize("experiment", ["regression", "focal_densenet", "classify", "char_lstm", "iwae_mnist"])
def test_direction_follows_monitor_mode(experiment):
    cfg = compose(f"experiment={experiment}", "hydra/sweeper=search", with_hydra=True)
    assert cfg.hydra.sweeper.direction == WORD[mode_of(cfg)]
    other = "min" if mode_of(cfg) == "max" else "max"
    flipped = compose(f"experiment={experiment}", "hydra/sweeper=search", f"trainer.monitor_mode={other}",
                      with_hydra=True)
    assert flipped.hydra.sweeper.direction == WORD[other]  # follows the mode, not the experiment's name
    given = compose(f"experiment={experiment}", "hydra/sweeper=search", f"hydra.sweeper.direction={WORD[other]}",
                    with_hydra=True)
    assert mode_of(given) != other and given.hydra.sweeper.direction == WORD[other]  # an explicit one wins


def test_any_optuna_sampler_by_its_target():
    from hydra.utils import instantiate

    cfg = compose("experiment=regression", "hydra/sweeper=search",
                  "hydra.sweeper.sampler._target_=optuna.samplers.RandomSampler", "hydra.sweeper.sampler.seed=3",
                  with_hydra=True)
    sweeper = instantiate(cfg.hydra.sweeper)
    assert isinstance(sweeper.sampler, optuna.samplers.RandomSampler) and sweeper.direction == "minimize"
    assert isinstance(instantiate(compose("hydra/sweeper=search", with_hydra=True).hydra.sweeper).sampler,
                      optuna.samplers.TPESampler)


def test_the_presets_cover_every_family():
    assert {"focal_densenet", "classify", "iwae_mnist", "char_lstm", "regression"} <= set(PRESETS)


@pytest.mark.parametrize("preset", PRESETS)
def test_hparams_search_preset_composes_and_its_space_fits(preset):
    """Each preset: a multirun of the search sweeper over optim.lr (log scale) and one more key;
    the experiment's config takes each dimension's bounds (keys and types checked by runner.config.typed)."""
    from optuna.distributions import CategoricalDistribution

    from runner.config import typed

    cfg = compose(f"hparams_search={preset}", with_hydra=True)
    assert cfg.name == preset  # it selects its experiment
    assert cfg.hydra.mode.name == "MULTIRUN"
    assert cfg.hydra.sweeper._target_.endswith("SearchSweeper")
    assert cfg.hydra.sweeper.direction == WORD[mode_of(cfg)]
    dimensions, fixed = search_space([f"{k}={v}" for k, v in cfg.hydra.sweeper.params.items()])
    space = {d.key: d.distribution for d in dimensions}
    assert fixed == [] and len(space) >= 2 and space["optim.lr"].log
    for bound in (0, -1):
        values = [(d.distribution.choices[bound] if isinstance(d.distribution, CategoricalDistribution)
                   else (d.distribution.low, d.distribution.high)[bound]) for d in dimensions]
        overrides = [f"{d.key}={v}" for d, v in zip(dimensions, values)]
        job = compose(f"hparams_search={preset}", *overrides)
        config = typed(job)
        for d, v in zip(dimensions, values):
            assert OmegaConf.select(job, d.key) == v
        assert config is not None


def test_search_space_from_overrides():
    dims, fixed = search_space(["optim.lr=tag(log, interval(1e-4, 1e-2))", "+model.dropout=interval(0, 0.5)",
                                "model.width=tag(int, interval(8, 64))", "trainer.batch_size=range(8, 33, 8)",
                                "loss=choice(bce, focal)", "experiment=regression", "+trainer.x=1",
                                "model.width=choice(4, 8)"])
    by_key = {d.key: d for d in dims}
    assert by_key["optim.lr"].distribution == optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)
    assert by_key["model.dropout"].distribution == optuna.distributions.FloatDistribution(0.0, 0.5)
    assert by_key["model.dropout"].prefix == "+"
    assert by_key["trainer.batch_size"].distribution == optuna.distributions.IntDistribution(8, 32, step=8)
    assert by_key["loss"].distribution == optuna.distributions.CategoricalDistribution(["bce", "focal"])
    assert by_key["model.width"].distribution == optuna.distributions.CategoricalDistribution([4, 8])  # the later one
    assert fixed == ["experiment=regression", "+trainer.x=1"]


def search_command(tmp_path: Path) -> list[str]:
    """README's command: 3 trials of hparams_search=regression on one SQLite study (named after the
    experiment); lr=1e4 diverges (a NaN loss: its job exits 1)."""
    return ["hparams_search=regression", "hydra.sweeper.n_trials=3", f"hydra.sweeper.storage={storage(tmp_path)}",
            "optim.lr=choice(0.05, 1e4)", "trainer.progress=none",
            f"output_root={tmp_path}"]


def storage(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'study.db'}"


def check_trials(study) -> None:
    """Each trial against its run folder: the config it ran with, FAIL where it diverged (the
    search went on), its value where it completed."""
    states = set()
    for trial in study.trials:
        run_dir = Path(trial.user_attrs["run_dir"])
        summary = json.loads((run_dir / "summary.json").read_text())
        ran = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
        assert ran.optim.lr == trial.params["optim.lr"] and ran.model.hidden == trial.params["model.hidden"]
        if trial.params["optim.lr"] == 1e4:
            assert trial.state == optuna.trial.TrialState.FAIL and summary["status"] == "failed"
            assert "non-finite" in summary["error"] and "non-finite" in trial.user_attrs["error"]
        else:
            assert trial.state == optuna.trial.TrialState.COMPLETE and summary["status"] == "completed"
            assert trial.value == summary["metrics"]["val/loss"]
        states.add(trial.state)
    # Seed 0's first draws hold both learning rates; were that to change, this test would say so.
    assert states == {optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL}


def test_search_records_a_diverging_trial_as_failed_and_writes_the_best(tmp_path):
    """The real command line: exit 0 with a failed trial among completed ones; best.json / best.yaml
    against the study (Optuna's reader) and the run folders; best.json's command is the best run
    again; runner.report shows it."""
    from runner import run
    from runner.report.table import main as report

    result = run_cli(*search_command(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    study = optuna.load_study(study_name="regression", storage=storage(tmp_path))
    assert len(study.trials) == 3 and study.direction.name == "MINIMIZE"
    check_trials(study)
    (sweep,) = (tmp_path / "multirun").iterdir()
    best = json.loads((sweep / "best.json").read_text())
    completed = [json.loads((Path(t.user_attrs["run_dir"]) / "summary.json").read_text()) | {"dir": t.user_attrs["run_dir"]}
                 for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    lowest = min((s["metrics"]["val/loss"], s["dir"]) for s in completed)
    assert (best["best"]["value"], best["best"]["run_dir"]) == lowest  # from the run folders
    assert best["best"]["trial"] == study.best_trial.number and best["best"]["params"] == study.best_trial.params
    assert best["trials"] == {s.name.lower(): sum(t.state == s for t in study.trials)
                              for s in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL)}
    assert OmegaConf.load(sweep / "best.yaml") == OmegaConf.load(Path(lowest[1]) / ".hydra" / "config.yaml")
    again = run(shlex.split(best["best"]["command"])[3:])  # "python -m runner ...": the best run again, one run
    assert again["status"] == "completed" and again["metrics"]["val/loss"] == pytest.approx(best["best"]["value"])
    # Titled by the experiment and the trial's own overrides; the search preset is not part of it.
    title = Path(again["run_dir"]).name.split("_", 2)[2]
    assert title == "-".join(["regression", *(k.split(".")[-1] + v for k, v in (o.split("=", 1) for o in best["best"]["params_overrides"]))]), title
    assert report([str(sweep)]) == 0
    shown = " ".join(report_output(sweep).split())
    assert f"best trial {best['best']['trial']}:" in shown and " ".join(best["best"]["params_overrides"]) in shown
    assert "1 complete" in shown or "2 complete" in shown


@pytest.mark.slow
def test_sqlite_study_goes_on_in_a_second_command(tmp_path):
    """The same command twice (~45 s on a 2-core CPU): the second adds 3 trials to the first's study,
    in its own sweep folder, and its best.json is the best of all 6."""
    codes = []
    for _ in range(2):
        result = run_cli(*search_command(tmp_path))
        assert result.returncode in (0, 1), result.stderr[-3000:]
        codes.append(result.returncode)
    study = optuna.load_study(study_name="regression", storage=storage(tmp_path))
    # exit 0 where one of the command's trials completed, 1 where none did (the second command's
    # sampler is reseeded: it may draw lr=1e4 three times)
    for command, code in enumerate(codes):
        trials = study.trials[3 * command: 3 * command + 3]
        assert code == (0 if any(t.state == optuna.trial.TrialState.COMPLETE for t in trials) else 1)
    assert [t.number for t in study.trials] == list(range(6))
    sweeps = sorted((tmp_path / "multirun").iterdir())
    assert [Path(t.user_attrs["run_dir"]).parent for t in study.trials] == [sweeps[0]] * 3 + [sweeps[1]] * 3
    check_trials(study)
    best = json.loads((sweeps[1] / "best.json").read_text())["best"]
    assert best["trial"] == study.best_trial.number and best["value"] == study.best_value
    assert "continues with 3 earlier trial(s)" in result.stderr + result.stdout


def report_output(sweep: Path) -> str:
    import io

    from rich.console import Console

    from runner.report.table import report_sweep

    out = io.StringIO()
    report_sweep(sweep, None, None, None, Console(file=out, width=200))
    return out.getvalue()


def test_resuming_a_search_folder_is_refused(tmp_path):
    (tmp_path / "0" / ".hydra").mkdir(parents=True)
    sweeper = stand_in_sweeper(tmp_path, returns=[])
    from runner.errors import UserError

    with pytest.raises(UserError, match="goes on through its study"):
        sweeper.sweep(["optim.lr=interval(0.1, 1)"])


# -- the sweeper against a stand-in launcher -------------------------------------------------

class Raised:
    """What launch() itself raises (an interrupt, a config that cannot be composed)."""

    def __init__(self, error: BaseException):
        self.error = error


class StandInLauncher:
    """Returns the given values in turn: a float (a completed job) or an exception (a failed one)."""

    def __init__(self, sweep_dir: Path, returns: list):
        self.sweep_dir, self.returns, self.launched = sweep_dir, list(returns), []

    def launch(self, job_overrides, initial_job_idx):
        out = []
        for idx, overrides in enumerate(job_overrides, initial_job_idx):
            value = self.returns.pop(0)
            if isinstance(value, Raised):
                raise value.error
            self.launched.append(list(overrides))
            ret = JobReturn(overrides=list(overrides), hydra_cfg=OmegaConf.create(
                {"hydra": {"runtime": {"output_dir": str(self.sweep_dir / str(idx))}}}))
            ret.status = JobStatus.FAILED if isinstance(value, Exception) else JobStatus.COMPLETED
            ret.return_value = value
            out.append(ret)
        return out


def stand_in_sweeper(sweep_dir: Path, returns: list, storage: str | None = None, **options) -> SearchSweeper:
    settings = {"direction": "minimize", "n_trials": len(returns) or 1, "n_jobs": 1, "storage": storage,
                "study_name": "s", "max_failure_rate": 1.0, "sampler": optuna.samplers.RandomSampler(seed=0),
                "params": {}, **options}
    sweeper = SearchSweeper(**settings)
    sweeper.config = OmegaConf.create({"trainer": {"monitor": "val/loss"},
                                       "hydra": {"sweep": {"dir": str(sweep_dir)}, "hydra_logging": {"root": None},
                                                 "verbose": False}})
    sweeper.launcher = StandInLauncher(sweep_dir, returns)
    return sweeper


def study_of(tmp_path: Path):
    return optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path / 's.db'}")


def test_nan_and_failed_jobs_are_failed_trials_and_the_best_is_the_lowest(tmp_path):
    sweeper = stand_in_sweeper(tmp_path, [0.5, math.nan, JobFailed("exit code 1"), 0.2, math.inf],
                               storage=f"sqlite:///{tmp_path / 's.db'}")
    sweeper.sweep(["optim.lr=interval(0.1, 1)", "experiment=regression"])
    study = study_of(tmp_path)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "FAIL", "FAIL", "COMPLETE", "FAIL"]
    assert all(o[0] == "experiment=regression" and o[1].startswith("optim.lr=") for o in sweeper.launcher.launched)
    assert [float(o[1].split("=")[1]) for o in sweeper.launcher.launched] == [t.params["optim.lr"] for t in study.trials]
    best = json.loads((tmp_path / "best.json").read_text())
    assert best["best"]["trial"] == 3 and best["best"]["value"] == 0.2
    assert best["trials"] == {"complete": 2, "fail": 3}


def test_no_completed_trial_fails_the_search(tmp_path):
    sweeper = stand_in_sweeper(tmp_path, [JobFailed("exit code 1"), math.nan])
    with pytest.raises(JobFailed, match="no trial completed"):
        sweeper.sweep(["optim.lr=interval(0.1, 1)"])
    assert json.loads((tmp_path / "best.json").read_text())["best"] is None


def test_max_failure_rate_stops_the_search(tmp_path):
    sweeper = stand_in_sweeper(tmp_path, [0.3, JobFailed("exit code 1"), 0.1, 0.1], max_failure_rate=0.4,
                               storage=f"sqlite:///{tmp_path / 's.db'}")
    with pytest.raises(JobFailed, match="1 of 2 trials failed"):
        sweeper.sweep(["optim.lr=interval(0.1, 1)"])
    assert len(study_of(tmp_path).trials) == 2 and len(sweeper.launcher.returns) == 2  # nothing more started


def test_an_interrupted_trial_ends_failed_and_interrupted(tmp_path):
    sweeper = stand_in_sweeper(tmp_path, [0.3, Raised(SweepInterrupted(130)), 0.1], storage=f"sqlite:///{tmp_path / 's.db'}")
    with pytest.raises(SweepInterrupted):
        sweeper.sweep(["optim.lr=interval(0.1, 1)"])
    trials = study_of(tmp_path).trials
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL"] and trials[1].user_attrs["status"] == "interrupted"
    assert json.loads((tmp_path / "best.json").read_text())["best"]["trial"] == 0


def test_a_continued_study_does_not_repeat_the_seeded_draws(tmp_path):
    """A seeded sampler in a second process would draw the first process's values again."""
    storage = f"sqlite:///{tmp_path / 's.db'}"
    first = stand_in_sweeper(tmp_path / "a", [0.5, 0.4], storage=storage,
                             sampler=optuna.samplers.TPESampler(seed=0))
    first.sweep(["optim.lr=interval(0.1, 1)"])
    second = stand_in_sweeper(tmp_path / "b", [0.5, 0.4], storage=storage,
                              sampler=optuna.samplers.TPESampler(seed=0))
    second.sweep(["optim.lr=interval(0.1, 1)"])
    lrs = [t.params["optim.lr"] for t in study_of(tmp_path).trials]
    assert len(lrs) == 4 and len(set(lrs)) == 4
    fresh = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0))
    space = {"optim.lr": optuna.distributions.FloatDistribution(0.1, 1)}
    assert fresh.ask(space).params["optim.lr"] == lrs[0]  # the first command is seeded (reproducible)


def test_a_config_that_cannot_be_composed(tmp_path):
    """On the first trial it is the command's mistake (raised: exit 2 with Hydra's message); later,
    a value of the space the config refuses, a failed trial: the search goes on."""
    from hydra.errors import ConfigCompositionException

    first = stand_in_sweeper(tmp_path / "a", [Raised(ConfigCompositionException("Could not override 'optim.lrr'"))])
    with pytest.raises(ConfigCompositionException):
        first.sweep(["optim.lrr=interval(0.1, 1)"])
    later = stand_in_sweeper(tmp_path / "b", [0.3, Raised(ConfigCompositionException("bad value")), 0.2],
                             storage=f"sqlite:///{tmp_path / 's.db'}")
    later.sweep(["optim.lr=interval(0.1, 1)"])
    trials = study_of(tmp_path).trials
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL", "COMPLETE"]
    assert "cannot be composed: bad value" in trials[1].user_attrs["status"]


def test_a_new_database_created_by_another_command_at_the_same_moment(tmp_path, monkeypatch):
    """Two commands that start together on a new SQLite file race to create its tables: the loser's
    error (seen with optuna 5.1: IntegrityError on alembic_version) is retried, and the study opens."""
    real, calls = optuna.create_study, []

    def racing(**kwargs):
        calls.append(kwargs["storage"])
        if len(calls) == 1:
            raise RuntimeError("(sqlite3.IntegrityError) UNIQUE constraint failed: alembic_version.version_num")
        return real(**kwargs)

    monkeypatch.setattr(optuna, "create_study", racing)
    sweeper = stand_in_sweeper(tmp_path, [0.5], storage=f"sqlite:///{tmp_path / 's.db'}")
    sweeper.sweep(["optim.lr=interval(0.1, 1)"])
    assert len(calls) == 2 and len(study_of(tmp_path).trials) == 1
    missing = stand_in_sweeper(tmp_path / "b", [0.5], storage=f"sqlite:///{tmp_path / 'no' / 'such' / 's.db'}")
    from runner.errors import UserError

    with pytest.raises(UserError, match="the study cannot be opened: .*unable to open database file"):
        missing.sweep(["optim.lr=interval(0.1, 1)"])
