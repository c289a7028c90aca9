"""``pstage tune --backend ray``: the same search on Ray Tune (``pip install 'pstage[ray]'``).

Ray schedules the trials (in parallel on every GPU/CPU of a Ray cluster: ``ray start --head`` and
``RAY_ADDRESS``), Optuna's sampler proposes them through Ray's ``OptunaSearch``, and ASHA stops
unpromising ones from the same per-epoch running CV value the Optuna backend reports. The search
writes its trials into the same Optuna storage and study as the Optuna backend, so ``--trials N``
means the same (the study's finished trials; re-running tops it up to N), ``pstage tune --show``
reports it and optuna-dashboard reads it. Each trial is a normal run named ``<study>-<NNN>`` (NNN =
the Optuna trial number). A trial ASHA stops is killed by Ray mid-fold: its run folder stays
``running`` (never ``done``), its Optuna trial ``PRUNED``.

Ray is imported only here, and only when asked for.
"""

from __future__ import annotations

import datetime as dt
import functools
import os
import time
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState
from rich.markup import escape

from pstage.config import Config, load_config
from pstage.core.console import console
from pstage.core.errors import ConfigError, PstageError, RunError
from pstage.core.io import read_json, write_json
from pstage.training.train import train
from pstage.tuning.reporter import CrossFoldReporter
from pstage.tuning.results import TuneResult, show_study
from pstage.tuning.space import decode, distributions, trial_config
from pstage.tuning.study import (
    FAIL_STREAK,
    check_base,
    fail_running,
    make_sampler,
    mark_trial,
    masked,
    max_steps,
    metric_value,
    trial_counts,
)

RUN_KEY = "pstage_run"  # added to each Ray trial's config: the run name (from the Optuna trial number)
STUDY_KEY, NUMBER_KEY = "pstage_study", "pstage_trial"  # and the study and trial number, for its run.json
METRIC = "objective"


def import_ray() -> Any:
    try:
        import ray  # optional extra [ray]: a missing package is the one-line error below
        from ray import tune  # noqa: F401
        from ray.tune.schedulers import ASHAScheduler  # noqa: F401
        from ray.tune.search.optuna import OptunaSearch  # noqa: F401
    except ImportError:
        raise ConfigError("--backend ray needs Ray Tune: pip install 'pstage[ray]'") from None
    return ray


def _report(metrics: dict[str, Any]) -> None:
    try:  # Ray >= 2.41 reports through ray.tune; older versions through ray.train
        from ray.tune import report  # optional extra [ray]: Ray >= 2.41 reports through ray.tune
    except ImportError:
        from ray.train import report  # optional extra [ray]: older Ray through ray.train
    report(metrics)


def trainable(params: dict[str, Any], *, base: dict[str, Any], runs: str) -> None:
    """One Ray trial: train the run with the sampled values, reporting the running CV value per epoch."""
    cfg0 = load_config(base)
    params = dict(params)
    name = params.pop(RUN_KEY)
    study, number = params.pop(STUDY_KEY), params.pop(NUMBER_KEY)
    cfg = trial_config(cfg0, decode(cfg0.tune.space, params))
    folds = cfg.train.folds if cfg.train.folds is not None else list(range(cfg.split.folds))

    def report(value: float, step: int, where: str) -> None:
        _report({METRIC: value, "step": step, "final": False})

    reporter = CrossFoldReporter(folds, cfg.train.epochs, report)
    result = train(cfg, runs=runs, name=name, fold_callbacks=reporter.callbacks)
    assert result is not None
    mark_trial(result.path, study, number)
    value = metric_value(result.cv, cfg0.tune.metric)
    _report({METRIC: value, "step": reporter.last_step + 1, "final": True, "cv_macro_f1": result.cv["macro_f1"]})


def _search_class() -> type:
    from ray.tune.search.optuna import OptunaSearch  # optional extra [ray]: import_ray() has said how to install it

    class PstageOptunaSearch(OptunaSearch):
        """OptunaSearch that names each trial's run and records only final results as COMPLETE.

        Ray reports a stopped (ASHA) trial's last intermediate result as its completion; here such a
        trial becomes PRUNED, so a partial running value is never taken for a finished CV score.
        """

        def __init__(self, *args: Any, study: str, runs: Path, **kwargs: Any):
            super().__init__(*args, **kwargs)
            self._pstage_study, self._pstage_runs = study, runs

        def suggest(self, trial_id: str) -> dict | None:
            params = super().suggest(trial_id)
            if params is None:
                return None
            ot_trial = self._ot_trials[trial_id]
            name = f"{self._pstage_study}-{ot_trial.number:03d}"
            ot_trial.set_user_attr("run", name)
            ot_trial.set_user_attr("run_path", str((self._pstage_runs / name).resolve()))
            ot_trial.set_user_attr("worker", f"ray:{os.getpid()}")
            return {**params, RUN_KEY: name, STUDY_KEY: self._pstage_study, NUMBER_KEY: ot_trial.number}

        def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
            if result is not None and not error and not result.get("final"):
                result = {k: v for k, v in result.items() if k != self.metric}  # no value -> PRUNED
            super().on_trial_complete(trial_id, result=result, error=error)

    return PstageOptunaSearch


def tune_ray(
    base: Config,
    name: str,
    runs: Path,
    *,
    trials: int,
    timeout: float | None,
    url: str,
    storage: optuna.storages.BaseStorage,
) -> TuneResult:
    """Run the study's remaining trials on Ray Tune; then report the study like the Optuna backend.

    As with the Optuna backend, a trial that crashes is FAIL and the search goes on (FAIL_STREAK in a
    row stop it), a trial stopped by the user's input (a PstageError) stops the search with its
    message, and Ctrl-C marks the running trials failed and re-raises KeyboardInterrupt.
    """
    import_ray()
    import ray  # optional extra [ray]: import_ray() has said how to install it

    runs = runs.resolve()
    study = optuna.create_study(storage=storage, study_name=name, direction="maximize", load_if_exists=True)
    check_base(study, base)
    finished = (TrialState.COMPLETE, TrialState.PRUNED)
    done = len(study.get_trials(deepcopy=False, states=finished))
    console.print(f"[bold]study {name}[/] ({masked(url)}) on Ray Tune: {done}/{trials} trials finished")
    if done >= trials:
        return show_study(name, url, runs, study=study)
    # Ctrl-C raises KeyboardInterrupt in this process (as with the Optuna backend) instead of Ray's
    # graceful stop, which returns from fit() as if the search were over.
    os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")
    started = time.time()
    own_ray = not ray.is_initialized()
    t0 = time.perf_counter()
    local = {} if os.environ.get("RAY_ADDRESS") else {"include_dashboard": False}  # a local Ray: no web UI processes
    ray.init(ignore_reinit_error=True, log_to_driver=True, **local)  # joins RAY_ADDRESS's cluster when set
    console.print(f"  Ray up in {time.perf_counter() - t0:.1f}s: {ray.cluster_resources().get('CPU', 0):g} CPU(s)")
    worker = f"ray:{os.getpid()}"
    try:
        while done < trials:
            left = None if timeout is None else timeout - (time.time() - started)
            if left is not None and left <= 0:
                break
            try:
                grid = _fit(base, name, runs, storage, samples=trials - done, timeout=left)
            except KeyboardInterrupt:
                ray.shutdown()  # stops the trial processes; then their trials and runs are marked failed
                failed = fail_running(study, worker=worker)
                for number in failed:
                    _mark_run_failed(runs / f"{name}-{number:03d}", "interrupted")
                c = trial_counts(study)
                which = ", ".join(f"trial {n} ({name}-{n:03d})" for n in failed) or "no trial"
                console.print(
                    f"[yellow]interrupted[/]: {which} marked failed; study {name} has {c.get('COMPLETE', 0)} complete, "
                    f"{c.get('PRUNED', 0)} pruned trials; run the same command to continue"
                )
                raise
            now = len(study.get_trials(deepcopy=False, states=finished))
            _check_failures(study, grid, name, runs, worker)
            if now == done and not any(r.error for r in grid):
                break  # the time budget ended the round
            done = now
    finally:
        if own_ray and ray.is_initialized():
            ray.shutdown()
    return show_study(name, url, runs, study=study)


def _fit(
    base: Config, name: str, runs: Path, storage: optuna.storages.BaseStorage, *, samples: int, timeout: float | None
) -> Any:
    """One Ray Tune search of ``samples`` trials (ASHA stops the unpromising); returns its ResultGrid."""
    import ray  # optional extra [ray]: import_ray() has said how to install it
    from ray import tune as rt  # optional extra [ray]: import_ray() has said how to install it
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler  # optional extra [ray]: as above

    try:
        from ray.tune import RunConfig  # optional extra [ray]: Ray >= 2.41
    except ImportError:  # Ray < 2.41
        from ray.train import RunConfig  # optional extra [ray]: Ray < 2.41

    tc = base.tune
    gpus = int(ray.cluster_resources().get("GPU", 0))
    cpus = int(ray.cluster_resources().get("CPU", 1))
    per_trial = {"gpu": 1, "cpu": max(1, cpus // max(gpus, 1))} if gpus else {"cpu": cpus}
    seed = tc.seed if tc.seed is not None else base.seed
    search = _search_class()(
        distributions(tc.space),
        metric=METRIC,
        mode="max",
        sampler=make_sampler(tc, seed),
        study_name=name,
        storage=storage,
        study=name,
        runs=runs,
    )
    # ASHA stands in for every Optuna pruner; tune.pruner=none keeps every trial (FIFO). Ray counts
    # reports from 1, Optuna's steps from 0: warm-up steps w protect iterations 1..w.
    scheduler = (
        FIFOScheduler()
        if tc.pruner == "none"
        else ASHAScheduler(
            time_attr="training_iteration",
            max_t=max_steps(base) + 1,  # + the final report carrying the CV metric
            grace_period=tc.pruner_warmup_steps + 1,
            reduction_factor=3,
        )
    )
    fn = functools.partial(trainable, base=base.to_dict(), runs=str(runs))
    tuner = rt.Tuner(
        rt.with_resources(fn, per_trial),
        tune_config=rt.TuneConfig(
            metric=METRIC,
            mode="max",
            search_alg=search,
            scheduler=scheduler,
            num_samples=samples,
            # No more trials asked of Optuna than can run: a queued one would sit RUNNING in the study.
            max_concurrent_trials=max(gpus, 1),
            time_budget_s=timeout,
        ),
        run_config=RunConfig(
            name=f"{name}-{dt.datetime.now():%Y%m%d-%H%M%S}",
            storage_path=str(runs / "tune" / "ray"),
            verbose=1,
        ),
    )
    return tuner.fit()


def _cause(error: BaseException | None) -> BaseException | None:
    """The trial's own exception inside Ray's wrappers (RayTaskError, TuneError).

    Ray may wrap a PstageError in a class derived from both RayTaskError and the error's own class,
    whose message is the worker's whole traceback: its ``cause`` is the exception as raised."""
    seen = 0
    while error is not None and seen < 5:
        inner = getattr(error, "cause", None) or error.__cause__
        if isinstance(error, PstageError) and not isinstance(inner, PstageError):
            return error
        error = inner
        seen += 1
    return error


def _check_failures(study: optuna.Study, grid: Any, name: str, runs: Path, worker: str) -> None:
    """Failed trials of one round: the user's input stops the search; crashes go on up to a streak."""
    for result in grid:
        if result.error is None:
            continue
        run = (result.config or {}).get(RUN_KEY, "?")
        cause = _cause(result.error)
        if isinstance(cause, PstageError) and not isinstance(cause, ConfigError):  # data, runs: the user's input
            raise type(cause)(f"trial {run.rsplit('-', 1)[-1].lstrip('0') or '0'} ({run}): {cause}") from None
        error = cause if cause is not None else result.error
        # a ConfigError: the sampled values cannot run here (a precision, a model at this size): this trial fails
        message = (
            str(error)
            if isinstance(error, ConfigError)
            else f"{type(error).__name__}: {' '.join(str(error).split())[:300]}"
        )
        where = f" (run {runs / run})" if (runs / run).exists() else ""
        console.print(f"[red]trial {run} failed[/]: {escape(message)}{where}; going on")
    mine = [t for t in study.get_trials(deepcopy=False) if t.user_attrs.get("worker") == worker]
    streak = 0
    for trial in sorted(mine, key=lambda t: t.number):
        streak = streak + 1 if trial.state == TrialState.FAIL else 0
    if streak >= FAIL_STREAK:
        last = mine[-1].user_attrs.get("run")
        raise RunError(
            f"{FAIL_STREAK} trials in a row failed, the last ({last}) with {_last_error(runs / str(last))}; "
            "fix the setup, then run the same command to continue"
        )


def _last_error(run_dir: Path) -> str:
    try:
        return str(read_json(run_dir / "run.json").get("error") or "an error")[:300]
    except (OSError, ValueError):
        return "an error"


def _mark_run_failed(run_dir: Path, reason: str) -> None:
    """A trial run whose process Ray stopped keeps status running: record it failed, as train() would."""
    path = run_dir / "run.json"
    try:
        info = read_json(path)
    except (OSError, ValueError):
        return
    if info.get("status") == "running":
        write_json(path, {**info, "status": "failed", "error": reason})
