"""``pstage tune``: hyper-parameter search a whole team can share, on Optuna (or Ray Tune).

The search space lives in the config (``tune.space``: dotted keys -> ranges or choices). Every
trial applies its sampled values to the base config (config file + KEY=VALUE overrides) and trains
a normal run, ``runs/<study>-<NNN>``, in-process; the objective is the run's CV metric
(``tune.metric``), optionally on a subset of folds (``tune.folds``). After every validation epoch
the trial reports a running CV estimate (see ``pstage.tuning.reporter``) so Optuna's pruners can stop
it; a pruned or failed trial's run is left ``failed``, never ``done``.

Sharing: the study lives in an Optuna storage (SQLite under runs/ by default; any SQLAlchemy
URL or a journal file for many machines). ``--trials N`` is the study's target of finished
(complete + pruned) trials: every worker running the same line stops once N are finished or being
run, so N machines finish N trials between them and re-running continues up to N (Optuna's
``MaxTrialsCallback`` recipe). Results (table, best config YAML, importances, plots) are computed
from the storage alone, so ``--show`` works on any machine and optuna-dashboard reads the study.
"""

from __future__ import annotations

import signal
import socket
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState
from rich.markup import escape

from pstage.config import Config, load_config
from pstage.core.console import console, quiet_lightning
from pstage.core.errors import ConfigError, DataError, PstageError, RunError
from pstage.runs.rundir import RunDir
from pstage.runs.store import publish_after, store_uri
from pstage.training.train import train
from pstage.tuning.ray_backend import import_ray, tune_ray
from pstage.tuning.reporter import CrossFoldReporter
from pstage.tuning.results import TuneResult, show_study
from pstage.tuning.space import check_single_process, check_space, suggest, trial_config
from pstage.tuning.study import (
    FAIL_STREAK,
    PRUNERS,
    WORKER,
    _is_journal,
    check_base,
    fail_running,
    live_running,
    make_pruner,
    make_sampler,
    mark_trial,
    masked,
    max_steps,
    metric_value,
    open_storage,
    short_value,
    storage_url,
    study_name,
    trial_counts,
)

# --------------------------------------------------------------------------------------------
# The command


def tune(
    config: str | Path | dict[str, Any] | Config | None = None,
    *,
    trials: int | None = None,
    storage: str | None = None,
    study: str | None = None,
    data: str | Path | None = None,
    runs: str | Path = "runs",
    overrides: Sequence[str] | dict[str, Any] = (),
    timeout: float | None = None,
    backend: str = "optuna",
    show: bool = False,
    store: str | None = None,
) -> TuneResult:
    """Run (or continue) a search until the study has ``trials`` finished trials; then report it.

    ``show=True`` only reports an existing study. Several processes or machines calling this
    with the same storage and study share the work. Ctrl-C marks the running trial failed and
    re-raises KeyboardInterrupt after one summary line. ``store`` (the team's MLflow server)
    publishes this machine's finished trial runs (kind ``trial``) once the search stops.
    """
    runs = Path(runs).expanduser()
    store = None if show else store_uri(store)  # a malformed address answers before any trial
    if backend not in ("optuna", "ray"):
        raise ConfigError(f"--backend {backend}: expected optuna or ray")
    if backend == "ray" and not show:
        import_ray()  # a missing extra answers first, in one line
    if show:
        base = load_config(config, list(overrides) if not isinstance(overrides, dict) else overrides)
        name = study_name(base, config, study)
        return show_study(name, storage_url(storage, runs), runs)
    base = load_config(config, list(overrides) if not isinstance(overrides, dict) else overrides)
    if data is not None:
        base.data.path = str(data)
    if not base.data.path:
        raise DataError("no data given: pass --data DIR (or set data.path in the config)")
    base.data.path = str(Path(base.data.path).expanduser().resolve())
    if not Path(base.data.path).exists():
        raise DataError(f"data path {base.data.path} does not exist")
    name = study_name(base, config, study)
    if trials is None or trials < 1:
        raise ConfigError("--trials N: give the study's number of trials (N >= 1), or --show to report it")
    if not base.tune.space:
        raise ConfigError(
            "tune.space is empty: add a search space to the config, e.g. tune: {space: {optim.lr: {low: 1.0e-4, high: 1.0e-2, log: true}}}"
        )
    check_single_process(base)
    PRUNERS.check(base.tune.pruner)
    url = storage_url(storage, runs)
    heartbeat = (base.tune.heartbeat_interval, base.tune.heartbeat_grace)
    opened = open_storage(url, heartbeat)  # an unreachable storage answers before torch is imported
    check_space(base)
    runs.mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if backend == "ray":
        result = tune_ray(base, name, runs, trials=trials, timeout=timeout, url=url, storage=opened)
    else:
        result = _tune_optuna(base, name, url, opened, runs, trials, timeout)
    _publish_trials(result.study, runs, store)
    return result


def _publish_trials(study: str, runs: Path, store: str | None) -> None:
    """Publish every finished trial run of ``study`` in ``runs`` (unchanged ones cost one look-up)."""
    if not store:
        return
    for record in sorted(runs.glob(f"{study}-[0-9]*/run.json")):
        if RunDir(record.parent).read_info().done:
            publish_after(record.parent, store)


def _tune_optuna(
    base: Config,
    name: str,
    url: str,
    storage: optuna.storages.BaseStorage,
    runs: Path,
    trials: int,
    timeout: float | None,
) -> TuneResult:
    quiet_lightning()
    seed = base.tune.seed if base.tune.seed is not None else base.seed
    try:
        study = optuna.create_study(
            storage=storage,
            study_name=name,
            direction="maximize",
            sampler=make_sampler(base.tune, seed),
            pruner=make_pruner(base.tune, max_steps(base)),
            load_if_exists=True,
        )
    except Exception as exc:  # e.g. a server that drops the connection after the first ping
        raise ConfigError(f"--storage {masked(url)}: cannot create or load study '{name}' ({exc})") from None
    if study.direction != optuna.study.StudyDirection.MAXIMIZE:
        raise RunError(
            f"study '{name}' in {masked(url)} minimises; pstage studies maximise the CV metric: use another --study"
        )
    check_base(study, base)
    finished = (TrialState.COMPLETE, TrialState.PRUNED)
    done = len(study.get_trials(deepcopy=False, states=finished))
    running = live_running(study, heartbeat=not _is_journal(url))
    objective = Objective(base, name, runs)
    interrupted = False
    others = f" (+{running} running elsewhere)" if running else ""
    console.print(
        f"[bold]study {name}[/] ({masked(url)}): {done}/{trials} trials finished{others}; metric {base.tune.metric}, "
        f"sampler {base.tune.sampler}, pruner {base.tune.pruner}"
    )
    if done + running >= trials:
        console.print(f"  nothing to run: the study has {done} finished trials{others} (raise --trials to continue it)")
    else:
        # A worker stops once finished + running trials (its own and others') reach N; counting the
        # others' running trials is what lets N machines finish N trials between them.
        stop_at_n = _StopAtN(trials, heartbeat=not _is_journal(url))
        sigint = signal.getsignal(signal.SIGINT) if threading.current_thread() is threading.main_thread() else None
        try:
            study.optimize(
                objective, timeout=timeout, callbacks=[stop_at_n], catch=(_TrialFailed,), gc_after_trial=True
            )
        except KeyboardInterrupt:
            interrupted = True
            fail_running(study)
        finally:
            if sigint is not None:  # Lightning ignores SIGINT after an interrupted fit; give it back
                signal.signal(signal.SIGINT, sigint)
    if interrupted:  # one line, no report: the user asked to stop
        c = trial_counts(study)
        which = (
            "no trial was running"
            if objective.current is None
            else f"trial {objective.current} ({name}-{objective.current:03d}) marked failed"
        )
        console.print(
            f"[yellow]interrupted[/]: {which}; study {name} has {c.get('COMPLETE', 0)} complete, "
            f"{c.get('PRUNED', 0)} pruned trials; run the same command to continue"
        )
        raise KeyboardInterrupt
    return show_study(name, url, runs, study=study)


class _StopAtN:
    """Optuna's MaxTrialsCallback over finished + running trials, with dead workers' trials failed first.

    Without the clean-up a SIGKILLed worker's trial would count as running until the next trial
    starts (Optuna fails stale trials only then), and the survivors would stop one trial short.
    """

    def __init__(self, trials: int, heartbeat: bool):
        self.trials, self.heartbeat = trials, heartbeat

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        live_running(study, self.heartbeat)  # fails stale trials (SQL storages)
        states = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
        if len(study.get_trials(deepcopy=False, states=states)) >= self.trials:
            study.stop()


class _TrialFailed(Exception):
    """A trial's training crashed (not the user's input): the trial is FAIL, the search goes on."""


class Objective:
    """Sample, train a run named <study>-<NNN> with per-epoch reports, return its CV metric."""

    def __init__(self, base: Config, study: str, runs: Path):
        self.base, self.study, self.runs = base, study, runs
        self.current: int | None = None
        self.fail_streak = 0

    def __call__(self, trial: optuna.Trial) -> float:
        self.current = trial.number
        trial.set_user_attr("worker", WORKER)
        name = f"{self.study}-{trial.number:03d}"
        run_dir = (self.runs / name).resolve()
        trial.set_user_attr("run", name)
        trial.set_user_attr("host", socket.gethostname())
        trial.set_user_attr("run_path", str(run_dir))
        values = {key: suggest(trial, key, param) for key, param in self.base.tune.space.items()}
        shown = ", ".join(f"{k}={short_value(v)}" for k, v in values.items())
        console.print(f"[bold cyan]trial {trial.number}[/] ({name}): {shown}")
        if run_dir.exists():
            raise RunError(
                f"{run_dir} already exists (a study named '{self.study}' that was deleted?); move it away or use another --study"
            )
        cfg = trial_config(self.base, values)
        folds = cfg.train.folds if cfg.train.folds is not None else list(range(cfg.split.folds))

        def report(value: float, step: int, where: str) -> None:
            trial.report(value, step)
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned at step {step} ({where}): running macro F1 {value:.4f}")

        reporter = CrossFoldReporter(folds, cfg.train.epochs, report)
        try:
            result = train(cfg, runs=self.runs, name=name, fold_callbacks=reporter.callbacks)
        except optuna.TrialPruned as exc:
            console.print(f"[yellow]trial {trial.number} {exc}[/]")
            self.fail_streak = 0
            for ckpt in run_dir.glob("fold_*/last.ckpt"):  # never resumed: a new trial is a new run
                ckpt.unlink(missing_ok=True)
            raise
        except SystemExit as exc:  # Lightning turns Ctrl-C during fit into sys.exit(1)
            raise KeyboardInterrupt from exc
        except ConfigError as exc:  # the sampled values cannot run here (a precision, a model at this size)
            raise self._failed(trial, name, run_dir, str(exc)) from None
        except PstageError as exc:  # the user's input (data, runs): stop the search with the message
            raise type(exc)(f"trial {trial.number} ({name}): {exc}") from None
        except Exception as exc:
            raise self._failed(
                trial, name, run_dir, f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
            ) from exc
        assert result is not None
        self.fail_streak = 0
        mark_trial(result.path, self.study, trial.number)
        value = metric_value(result.cv, self.base.tune.metric)
        trial.set_user_attr(
            "cv",
            {k: result.cv.get(k) for k in ("macro_f1", "macro_f1_std", "oof_macro_f1", "accuracy", "per_task")},
        )
        trial.set_user_attr("duration_s", round(result.duration_s, 1))
        return value

    def _failed(self, trial: optuna.Trial, name: str, run_dir: Path, message: str) -> Exception:
        """A trial that could not train: FAIL it and go on, unless FAIL_STREAK trials in a row failed."""
        self.fail_streak += 1
        trial.set_user_attr("error", message)
        if self.fail_streak >= FAIL_STREAK:
            return RunError(
                f"{FAIL_STREAK} trials in a row failed, the last ({name}) with {message}; fix the setup, then run the same command to continue"
            )
        where = f" (run {run_dir})" if run_dir.exists() else ""
        console.print(f"[red]trial {trial.number} failed[/]: {escape(message)}{where}; going on")
        return _TrialFailed(message)
