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
from pathlib import Path
from typing import Any

import optuna

from pstage.config import Config
from pstage.core.console import console
from pstage.core.errors import ConfigError
from pstage.tuning.results import TuneResult, show_study
from pstage.tuning.space import decode, distributions, trial_config
from pstage.tuning.study import check_base, fail_running, make_sampler, mark_trial, masked, max_steps, metric_value

RUN_KEY = "pstage_run"  # added to each Ray trial's config: the run name (from the Optuna trial number)
STUDY_KEY, NUMBER_KEY = "pstage_study", "pstage_trial"  # and the study and trial number, for its run.json
METRIC = "objective"


def import_ray() -> Any:
    try:
        import ray
        from ray import tune  # noqa: F401
        from ray.tune.schedulers import ASHAScheduler  # noqa: F401
        from ray.tune.search.optuna import OptunaSearch  # noqa: F401
    except ImportError:
        raise ConfigError("--backend ray needs Ray Tune: pip install 'pstage[ray]'") from None
    return ray


def _report(metrics: dict[str, Any]) -> None:
    try:  # Ray >= 2.41 reports through ray.tune; older versions through ray.train
        from ray.tune import report
    except ImportError:
        from ray.train import report
    report(metrics)


def trainable(params: dict[str, Any], *, base: dict[str, Any], runs: str) -> None:
    """One Ray trial: train the run with the sampled values, reporting the running CV value per epoch."""
    from pstage.config import load_config
    from pstage.training.train import train
    from pstage.tuning.reporter import CrossFoldReporter

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
    from ray.tune.search.optuna import OptunaSearch

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
    """Run the study's remaining trials on Ray Tune; then report the study like the Optuna backend."""
    import_ray()
    import ray
    from optuna.trial import TrialState
    from ray import tune as rt
    from ray.tune.schedulers import ASHAScheduler

    try:
        from ray.tune import RunConfig
    except ImportError:  # Ray < 2.41
        from ray.train import RunConfig

    runs = runs.resolve()
    tc = base.tune
    study = optuna.create_study(storage=storage, study_name=name, direction="maximize", load_if_exists=True)
    check_base(study, base)
    done = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))
    console.print(f"[bold]study {name}[/] ({masked(url)}) on Ray Tune: {done}/{trials} trials finished")
    if done < trials:
        ray.init(ignore_reinit_error=True, log_to_driver=True)  # joins RAY_ADDRESS's cluster when set
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
        steps = max_steps(base)
        scheduler = ASHAScheduler(
            time_attr="training_iteration",
            max_t=steps + 1,  # + the final report carrying the CV metric
            grace_period=max(1, tc.pruner_warmup_steps),
            reduction_factor=3,
        )
        fn = functools.partial(trainable, base=base.to_dict(), runs=str(runs))
        tuner = rt.Tuner(
            rt.with_resources(fn, per_trial),
            tune_config=rt.TuneConfig(
                metric=METRIC,
                mode="max",
                search_alg=search,
                scheduler=scheduler,
                num_samples=trials - done,
                time_budget_s=timeout,
            ),
            run_config=RunConfig(
                name=f"{name}-{dt.datetime.now():%Y%m%d-%H%M%S}",
                storage_path=str(runs / "tune" / "ray"),
                verbose=1,
            ),
        )
        try:
            tuner.fit()
        except KeyboardInterrupt:
            failed = fail_running(study, worker=f"ray:{os.getpid()}")
            console.print(
                f"[yellow]interrupted[/]: trial(s) {', '.join(map(str, failed)) or 'none'} marked failed; run the same command to continue"
            )
            raise
    return show_study(name, url, runs, study=study)
