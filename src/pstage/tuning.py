"""``pstage tune``: hyper-parameter search a whole team can share, on Optuna (or Ray Tune).

The search space lives in the config (``tune.space``: dotted keys -> ranges or choices). Every
trial applies its sampled values to the base config (config file + KEY=VALUE overrides) and trains
a normal run, ``runs/<study>-<NNN>``, in-process; the objective is the run's CV metric
(``tune.metric``), optionally on a subset of folds (``tune.folds``). After every validation epoch
the trial reports a running CV estimate (see ``pstage.tune_report``) so Optuna's pruners can stop
it; a pruned or failed trial's run is left ``failed``, never ``done``.

Sharing: the study lives in an Optuna storage (SQLite under runs/ by default; any SQLAlchemy
URL or a journal file for many machines). ``--trials N`` is the study's target of finished
(complete + pruned) trials: every worker running the same line stops once N are finished or being
run, so N machines finish N trials between them and re-running continues up to N (Optuna's
``MaxTrialsCallback`` recipe). Results (table, best config YAML, importances, plots) are computed
from the storage alone, so ``--show`` works on any machine and optuna-dashboard reads the study.
"""

from __future__ import annotations

import fcntl
import math
import os
import re
import signal
import socket
import threading
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args

import optuna
import yaml
from optuna.trial import TrialState

from pstage.config import Config, TuneConfig, TuneParam, diff_configs, load_config, merge
from pstage.console import console
from pstage.errors import ConfigError, DataError, PstageError, RunError

BASE_ATTR = "pstage.base_config"  # study user attr: the base config every trial starts from
RESULTS_DIR = "tune"  # runs/tune/<study>/: best.yaml, trials.csv, importances.json, plots
PRIMITIVE = (type(None), bool, int, float, str)
WORKER = f"{socket.gethostname()}:{os.getpid()}"  # marks this process's trials (Ctrl-C clean-up)
FAIL_STREAK = 3  # a worker stops after this many failed trials in a row (a broken setup, not bad luck)
# Base-config keys that may differ between the workers of one study (paths, speed, logging).
SHAREABLE_KEYS = (
    "data.path",
    "data.cache_dir",
    "train.num_workers",
    "train.progress",
    "train.accelerator",
    "train.devices",
    "log.",
    "tune.",  # the search may be widened or re-tuned mid-study; what a trial measures may not change:
)
OBJECTIVE_KEYS = ("tune.metric", "tune.folds")


@dataclass
class TuneResult:
    """What a search produced: the study's state and the files written from it."""

    study: str
    storage: str
    counts: dict[str, int]
    best: dict[str, Any] | None
    files: dict[str, Path] = field(default_factory=dict)
    importances: dict[str, float] | None = None


# --------------------------------------------------------------------------------------------
# The search space


def _field_kind(key: str) -> str | None:
    """'int' or 'float' when the config key holds a plain (optional) number, else None."""
    model: Any = Config
    parts = key.split(".")
    for part in parts[:-1]:
        model = model.model_fields[part].annotation
    annotation = model.model_fields[parts[-1]].annotation
    kinds = {a for a in (get_args(annotation) or (annotation,)) if a is not type(None)}
    if kinds == {int}:
        return "int"
    if kinds == {float}:
        return "float"
    return None


def param_kind(key: str, param: TuneParam) -> str:
    """The distribution of a space entry: explicit type, categorical for choices, else the key's type."""
    if param.type:
        return param.type
    if param.choices is not None:
        return "categorical"
    kind = _field_kind(key)
    if kind is None:
        raise ConfigError(
            f"tune.space[{key}]: '{key}' is not a number; give choices: [...] (or type: int/float for a range)"
        )
    return kind


def _encoded(param: TuneParam) -> bool:
    """Optuna stores only None/bool/int/float/str choices: others (lists like image sizes) go as YAML text."""
    return any(not isinstance(c, PRIMITIVE) for c in param.choices or [])


def _flow(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip().removesuffix("...").strip()


def suggest(trial: Any, key: str, param: TuneParam) -> Any:
    """Sample one config value for ``key`` from an Optuna trial (also Ray's define-by-run trials)."""
    kind = param_kind(key, param)
    if kind == "categorical":
        if _encoded(param):
            return yaml.safe_load(trial.suggest_categorical(key, [_flow(c) for c in param.choices or []]))
        return trial.suggest_categorical(key, list(param.choices or []))
    assert param.low is not None and param.high is not None
    if kind == "int":
        return trial.suggest_int(key, int(param.low), int(param.high), step=int(param.step or 1), log=param.log)
    return trial.suggest_float(key, float(param.low), float(param.high), step=param.step, log=param.log)


def distributions(space: dict[str, TuneParam]) -> dict[str, optuna.distributions.BaseDistribution]:
    """The space as Optuna distributions (Ray's OptunaSearch, rebuilding trials from Ray results)."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    out: dict[str, Any] = {}
    for key, param in space.items():
        kind = param_kind(key, param)
        if kind == "categorical":
            choices = [_flow(c) for c in param.choices or []] if _encoded(param) else list(param.choices or [])
            out[key] = CategoricalDistribution(choices)
        elif kind == "int":
            out[key] = IntDistribution(
                int(param.low or 0), int(param.high or 0), step=int(param.step or 1), log=param.log
            )
        else:
            out[key] = FloatDistribution(float(param.low or 0), float(param.high or 0), step=param.step, log=param.log)
    return out


def decode(space: dict[str, TuneParam], params: dict[str, Any]) -> dict[str, Any]:
    """Stored trial params back to config values (YAML-encoded choices parsed)."""
    out = {}
    for key, value in params.items():
        param = space.get(key)
        out[key] = yaml.safe_load(value) if param is not None and _encoded(param) and isinstance(value, str) else value
    return out


def nested(values: dict[str, Any]) -> dict[str, Any]:
    """``{"optim.lr": 1e-3}`` -> ``{"optim": {"lr": 1e-3}}`` (config override form)."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


def trial_config(base: Config, values: dict[str, Any]) -> Config:
    """The config one trial trains: base + sampled values, on ``tune.folds``, without the tune section.

    The tune section is reset so a trial's run (and the best config) is a plain training config:
    re-training it never trips over search settings.
    """
    merged = merge(base.to_dict(), nested(values))
    merged["tune"] = {}
    if base.tune.folds is not None:
        merged["train"]["folds"] = list(base.tune.folds)
    return load_config(merged)


def check_space(base: Config) -> None:
    """Every bound and choice must be a valid value of its key (and model/optimizer names must exist)."""
    from pstage.models import check_model_name
    from pstage.training import check_optimizer

    for key, param in base.tune.space.items():
        kind = param_kind(key, param)
        candidates = list(param.choices or []) if kind == "categorical" else [param.low, param.high]
        if kind == "int":
            candidates = [int(c) for c in candidates]  # type: ignore[arg-type]
        for value in candidates:
            try:
                load_config(merge(base.to_dict(), nested({key: value})))
            except ConfigError as exc:
                raise ConfigError(f"tune.space[{key}]: {value!r} is not a valid value ({exc})") from None
            try:
                if key == "model.name":
                    check_model_name(str(value))
                elif key == "optim.name":
                    check_optimizer(str(value))
            except ConfigError as exc:
                raise ConfigError(f"tune.space[{key}]: {exc}") from None


def _check_single_process(cfg: Config) -> None:
    t = cfg.train
    devices = t.devices
    many = len(devices) != 1 if isinstance(devices, list) else str(devices) != "1"  # "auto" may mean all GPUs
    if many or t.num_nodes > 1 or t.strategy.startswith("ddp"):
        raise ConfigError(
            f"pstage tune trains trials in-process on one device (train.devices={devices}, train.strategy={t.strategy}); "
            "run one worker per GPU instead (CUDA_VISIBLE_DEVICES=k pstage tune ... on the same storage)"
        )


# --------------------------------------------------------------------------------------------
# Storage, study name, sampler, pruner


def study_name(cfg: Config, config: Any, study: str | None) -> str:
    """--study, else tune.study, else the config file's name, else 'study'."""
    name = study or cfg.tune.study
    if not name:
        name = Path(config).stem if isinstance(config, (str, Path)) else "study"
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+=-]*", name):
        raise ConfigError(
            f"study name '{name}': use letters, digits and . _ + = - (trial runs are named <study>-<NNN>)"
        )
    return name


def storage_url(storage: str | None, runs: Path) -> str:
    """The storage a spec names: default ``sqlite:///<runs>/tune.db``; ``*.db`` paths are SQLite too."""
    if storage is None:
        return f"sqlite:///{(runs / 'tune.db').resolve()}"
    if "://" not in storage and not _is_journal(storage):
        if storage.endswith((".db", ".sqlite", ".sqlite3")):
            return f"sqlite:///{Path(storage).expanduser().resolve()}"
        raise ConfigError(
            f"--storage {storage}: expected an SQLAlchemy URL (sqlite:///runs/tune.db, postgresql://user@host/db, "
            "mysql+pymysql://...), a journal file (journal:PATH, *.log, *.journal) or an SQLite file (*.db)"
        )
    return storage


def _is_journal(spec: str) -> bool:
    return spec.startswith("journal:") or ("://" not in spec and spec.endswith((".log", ".journal")))


def masked(url: str) -> str:
    """The storage URL with any password hidden (it is printed and stored in messages)."""
    return re.sub(r"(://[^:/@]+:)[^@/]+@", r"\1***@", url)


def open_storage(url: str) -> optuna.storages.BaseStorage:
    """An Optuna storage for the URL; a storage that cannot be opened is one ConfigError line.

    RDB storages get a heartbeat, so a trial whose worker died (power cut, SIGKILL) turns FAIL
    after 3 minutes instead of counting as running forever. SQLite waits up to 60 s for a lock
    (several workers on one machine). Journal files take locks of their own (also on NFS).
    """
    try:
        if _is_journal(url):
            from optuna.storages.journal import JournalFileBackend, JournalStorage

            path = Path(url.removeprefix("journal:")).expanduser()
            path.parent.mkdir(parents=True, exist_ok=True)
            return JournalStorage(JournalFileBackend(str(path)))
        engine_kwargs: dict[str, Any] = {}
        if url.startswith("sqlite:///"):
            db = Path(url.removeprefix("sqlite:///"))
            if not db.parent.is_dir():
                if db.parent.parent.is_dir():  # the runs folder itself is made on demand
                    db.parent.mkdir(parents=True, exist_ok=True)
                else:
                    raise FileNotFoundError(f"folder {db.parent} does not exist")
            engine_kwargs = {"connect_args": {"timeout": 60}}
        elif url.startswith(("postgresql", "mysql")):
            engine_kwargs = {"connect_args": {"connect_timeout": 10}, "pool_pre_ping": True}
        return _rdb_storage(url, engine_kwargs)
    except Exception as exc:
        reason = getattr(exc, "orig", None) or exc
        text = " ".join(str(reason).split())[:240]
        if isinstance(exc, ImportError):
            hint = "install the database driver (e.g. pip install psycopg2-binary or pymysql)"
        elif url.startswith("sqlite") or _is_journal(url):
            hint = "check the path (its folder must exist and be writable)"
        else:
            hint = "check the URL, the credentials and that the server is reachable from here"
        raise ConfigError(
            f"--storage {masked(url)}: cannot open it ({type(reason).__name__}: {text}); {hint}"
        ) from None


def _rdb_storage(url: str, engine_kwargs: dict[str, Any]) -> optuna.storages.RDBStorage:
    """RDBStorage, safe when several workers start at once on a new database.

    Optuna creates the schema on first use, and two processes doing it together fail ("table
    studies already exists"). SQLite workers take turns under a lock on the database's folder;
    server databases get a few retries.
    """
    folder = None
    if url.startswith("sqlite:///"):
        folder = os.open(Path(url.removeprefix("sqlite:///")).parent, os.O_RDONLY)
        fcntl.flock(folder, fcntl.LOCK_EX)
    try:
        for attempt in range(4):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                    return optuna.storages.RDBStorage(
                        url, engine_kwargs=engine_kwargs, heartbeat_interval=30, grace_period=180
                    )
            except ImportError:
                raise
            except Exception:
                if attempt == 3:
                    raise
                time.sleep(1.0 + attempt)
        raise AssertionError("unreachable")
    finally:
        if folder is not None:
            fcntl.flock(folder, fcntl.LOCK_UN)
            os.close(folder)


class TrialSeededSampler(optuna.samplers.BaseSampler):
    """TPE (or random) rebuilt for every trial with seed ``seed + trial number``.

    Why: two workers with the same seeded TPESampler propose the *same* startup trials. Seeding by
    trial number keeps a single worker reproducible (trial n samples with seed+n given the same
    history) while workers sharing a storage, which never share a trial number, explore different
    points. TPE keeps no state between trials besides its random generator (it reads the history
    from the storage), so rebuilding it per trial loses nothing. Picklable (Ray checkpoints it).
    """

    def __init__(self, kind: str = "tpe", seed: int = 0, startup_trials: int = 10):
        self.kind, self.seed, self.startup_trials = kind, seed, startup_trials
        self._inner = self._build(seed)

    def _build(self, seed: int) -> optuna.samplers.BaseSampler:
        if self.kind == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        # constant_liar: a worker treats others' running trials as bad, so parallel trials spread out.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.TPESampler(seed=seed, n_startup_trials=self.startup_trials, constant_liar=True)

    def before_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        self._inner = self._build(self.seed + trial.number)
        self._inner.before_trial(study, trial)

    def infer_relative_search_space(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> dict[str, Any]:
        return self._inner.infer_relative_search_space(study, trial)

    def sample_relative(
        self, study: optuna.Study, trial: optuna.trial.FrozenTrial, search_space: dict[str, Any]
    ) -> dict[str, Any]:
        return self._inner.sample_relative(study, trial, search_space)

    def sample_independent(self, study: optuna.Study, trial: optuna.trial.FrozenTrial, name: str, dist: Any) -> Any:
        return self._inner.sample_independent(study, trial, name, dist)

    def after_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial, state: TrialState, values: Any) -> None:
        self._inner.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self._inner.reseed_rng()


def make_sampler(tc: TuneConfig, seed: int) -> TrialSeededSampler:
    return TrialSeededSampler(tc.sampler, seed, tc.startup_trials)


def max_steps(base: Config) -> int:
    """Reported steps of the longest possible trial: folds x epochs (the largest epochs in the space)."""
    folds = len(base.tune.folds or base.train.folds or range(base.split.folds))
    epochs = base.train.epochs
    param = base.tune.space.get("train.epochs")
    if param is not None:
        epochs = int(max(param.choices or [param.high or epochs]))
    return folds * epochs


def make_pruner(tc: TuneConfig, steps: int) -> Any:
    if tc.pruner == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=tc.pruner_startup_trials, n_warmup_steps=tc.pruner_warmup_steps
        )
    if tc.pruner == "halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=max(1, tc.pruner_warmup_steps), reduction_factor=3)
    if tc.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(steps, 1), reduction_factor=3)
    if tc.pruner == "threshold":
        return optuna.pruners.ThresholdPruner(lower=tc.prune_below, n_warmup_steps=tc.pruner_warmup_steps)
    return optuna.pruners.NopPruner()


def check_base(study: optuna.Study, base: Config) -> None:
    """A study keeps one base config: refuse a worker whose settings differ (trials would not compare)."""
    saved = study.user_attrs.get(BASE_ATTR)
    current = base.to_dict()
    if saved is None:
        study.set_user_attr(BASE_ATTR, current)
        return
    searched = tuple(base.tune.space)
    changes = [
        c
        for c in diff_configs(saved, current)
        if (c[0].startswith(OBJECTIVE_KEYS) or not c[0].startswith(SHAREABLE_KEYS)) and not c[0].startswith(searched)
    ]
    if changes:
        key, old, new = changes[0]
        more = f" (and {len(changes) - 1} more)" if len(changes) > 1 else ""
        raise RunError(
            f"study '{study.study_name}' searches with {key}={old}; this command asks {key}={new}{more}: use the study's settings, or a new --study"
        )
    if saved.get("tune") != current["tune"]:  # a widened space: results decode with the latest one
        study.set_user_attr(BASE_ATTR, {**saved, "tune": current["tune"]})


# --------------------------------------------------------------------------------------------
# The objective


class _TrialFailed(Exception):
    """A trial's training crashed (not the user's input): the trial is FAIL, the search goes on."""


class Objective:
    """Sample, train a run named <study>-<NNN> with per-epoch reports, return its CV metric."""

    def __init__(self, base: Config, study: str, runs: Path):
        self.base, self.study, self.runs = base, study, runs
        self.current: int | None = None
        self.fail_streak = 0

    def __call__(self, trial: optuna.Trial) -> float:
        from pstage.training import train
        from pstage.tune_report import CrossFoldReporter

        self.current = trial.number
        trial.set_user_attr("worker", WORKER)
        name = f"{self.study}-{trial.number:03d}"
        run_dir = (self.runs / name).resolve()
        trial.set_user_attr("run", name)
        trial.set_user_attr("host", socket.gethostname())
        trial.set_user_attr("run_path", str(run_dir))
        values = {key: suggest(trial, key, param) for key, param in self.base.tune.space.items()}
        shown = ", ".join(f"{k}={_short(v)}" for k, v in values.items())
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
        except PstageError as exc:  # the user's input: stop the search with the message
            raise type(exc)(f"trial {trial.number} ({name}): {exc}") from None
        except Exception as exc:
            self.fail_streak += 1
            message = f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
            trial.set_user_attr("error", message)
            if self.fail_streak >= FAIL_STREAK:
                raise RunError(
                    f"{FAIL_STREAK} trials in a row failed, the last ({name}) with {message}; fix the setup, then run the same command to continue"
                ) from None
            console.print(f"[red]trial {trial.number} failed[/]: {message} (run {run_dir}); going on")
            raise _TrialFailed(message) from exc
        assert result is not None
        self.fail_streak = 0
        value = metric_value(result.cv, self.base.tune.metric)
        trial.set_user_attr(
            "cv",
            {k: result.cv.get(k) for k in ("macro_f1", "macro_f1_std", "oof_macro_f1", "accuracy", "per_task")},
        )
        trial.set_user_attr("duration_s", round(result.duration_s, 1))
        return value


def metric_value(cv: dict[str, Any], metric: str) -> float:
    """The objective from a run's ``cv`` summary (``per_task.age`` reads cv["per_task"]["age"])."""
    node: Any = cv
    for part in metric.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    if node is None:
        heads = ", ".join(cv.get("per_task") or {}) or "none"
        raise ConfigError(f"tune.metric {metric}: not in this task's CV (heads: {heads}); use macro_f1")
    return float(node)


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return _flow(value) if isinstance(value, (list, tuple, dict)) else str(value)


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
) -> TuneResult:
    """Run (or continue) a search until the study has ``trials`` finished trials; then report it.

    ``show=True`` only reports an existing study. Several processes or machines calling this
    with the same storage and study share the work. Ctrl-C marks the running trial failed and
    re-raises KeyboardInterrupt after one summary line.
    """
    runs = Path(runs).expanduser()
    if backend not in ("optuna", "ray"):
        raise ConfigError(f"--backend {backend}: expected optuna or ray")
    if backend == "ray" and not show:
        from pstage.tune_ray import import_ray

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
    _check_single_process(base)
    url = storage_url(storage, runs)
    opened = open_storage(url)  # an unreachable storage answers before torch is imported
    check_space(base)
    runs.mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if backend == "ray":
        from pstage.tune_ray import tune_ray

        return tune_ray(base, name, runs, trials=trials, timeout=timeout, url=url, storage=opened)
    return _tune_optuna(base, name, url, opened, runs, trials, timeout)


def _tune_optuna(
    base: Config,
    name: str,
    url: str,
    storage: optuna.storages.BaseStorage,
    runs: Path,
    trials: int,
    timeout: float | None,
) -> TuneResult:
    from optuna.study import MaxTrialsCallback

    from pstage.console import quiet_lightning

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
    running = _live_running(study, heartbeat=not _is_journal(url))
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
        stop_at_n = MaxTrialsCallback(trials, states=(*finished, TrialState.RUNNING))
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
        c = _counts(study)
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


def _live_running(study: optuna.Study, heartbeat: bool) -> int:
    """Trials other workers are running now; 0 where dead workers' trials cannot be told apart.

    With a heartbeat (SQL storages) trials of dead workers are failed first, so the rest are live.
    A journal file keeps no heartbeat: its running trials are not trusted at start-up (a crashed
    worker's trial would block the study forever), at worst one trial more than --trials is run.
    """
    if not heartbeat:
        return 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        optuna.storages.fail_stale_trials(study)
    return len(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))


def _counts(study: optuna.Study) -> dict[str, int]:
    counts: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        counts[t.state.name] = counts.get(t.state.name, 0) + 1
    return counts


def fail_running(study: optuna.Study, worker: str = WORKER) -> list[int]:
    """Mark this worker's still-running trials FAIL (Optuna does it unless Ctrl-C hit its own code).

    Other workers' running trials are theirs: they are left alone.
    """
    failed = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if trial.user_attrs.get("worker") == worker:
            try:
                study.tell(trial.number, state=TrialState.FAIL)
                failed.append(trial.number)
            except Exception:  # finished meanwhile; nothing to repair
                pass
    return failed


# --------------------------------------------------------------------------------------------
# Results


def load_study(name: str, url: str) -> optuna.Study:
    storage = open_storage(url)
    try:
        return optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        names = [s.study_name for s in optuna.get_all_study_summaries(storage)]
        raise RunError(
            f"no study '{name}' in {masked(url)}"
            + (f"; studies there: {', '.join(names)}" if names else " (it is empty)")
        ) from None


def best_config(study: optuna.Study) -> tuple[Config, Any] | None:
    """The best complete trial's config (base + its values, every fold), or None without one."""
    saved = study.user_attrs.get(BASE_ATTR)
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if saved is None or not complete:
        return None
    base = load_config(saved)
    best = max(complete, key=lambda t: t.value if t.value is not None else -math.inf)
    merged = merge(base.to_dict(), nested(decode(base.tune.space, best.params)))
    merged["tune"] = {}
    return load_config(merged), best


def show_study(name: str, url: str, runs: Path, study: optuna.Study | None = None) -> TuneResult:
    """Print the top trials; write best.yaml, trials.csv, importances.json and the history plots."""
    study = study or load_study(name, url)
    trials = study.get_trials(deepcopy=False)
    counts = _counts(study)
    out = runs / RESULTS_DIR / name
    out.mkdir(parents=True, exist_ok=True)
    saved = study.user_attrs.get(BASE_ATTR) or {}
    tc = load_config(saved).tune if saved else TuneConfig()
    _print_table(study, trials, tc)
    summary = ", ".join(f"{n} {s.lower()}" for s, n in sorted(counts.items())) or "no trials"
    console.print(f"study {name}: {summary}")
    result = TuneResult(name, masked(url), counts, None)
    result.files["trials"] = _write_trials(trials, out / "trials.csv")
    found = best_config(study)
    if found is not None:
        cfg, best = found
        result.best = {
            "number": best.number,
            "value": best.value,
            "run": best.user_attrs.get("run"),
            "params": decode(tc.space, best.params),
        }
        result.files["best_config"] = _write_best(cfg, best, name, tc, out / "best.yaml")
        console.print(
            f"best: trial {best.number} ({best.user_attrs.get('run')}) {tc.metric} {best.value:.4f} -> "
            f"{result.files['best_config']}\n  train it on every fold: pstage train --config {result.files['best_config']} --name {name}-best"
        )
    else:
        console.print("best: no complete trial yet")
    n_complete = counts.get(TrialState.COMPLETE.name, 0)
    result.importances = _importances(study, n_complete, out / "importances.json")
    if result.importances:
        result.files["importances"] = out / "importances.json"
    result.files.update(_plots(study, out))
    shown = [str(p) for k, p in result.files.items() if k in ("history", "intermediate")]
    if shown:
        console.print(f"plots: {', '.join(shown)}")
    if url.startswith(("sqlite", "postgresql", "mysql")):
        console.print(f"[dim]live view: optuna-dashboard {masked(url)}[/]")
    return result


def _print_table(study: optuna.Study, trials: list[Any], tc: TuneConfig) -> None:
    from rich.table import Table

    complete = sorted(
        (t for t in trials if t.state == TrialState.COMPLETE), key=lambda t: t.value or -math.inf, reverse=True
    )
    others = [t for t in trials if t.state != TrialState.COMPLETE]
    rows = (
        complete[: tc.top] + others[-max(0, tc.top - len(complete)) :] if len(complete) < tc.top else complete[: tc.top]
    )
    table = Table(title=f"study {study.study_name}: best trials by {tc.metric}")
    for column in ("#", "run", "state", tc.metric, "time", "params"):
        table.add_column(column, justify="right" if column in ("#", tc.metric, "time") else "left")
    for t in rows:
        seconds = t.duration.total_seconds() if t.duration else None
        if t.state == TrialState.COMPLETE:
            value = f"{t.value:.4f}"
        elif t.intermediate_values:
            step = max(t.intermediate_values)
            value = f"[dim]{t.intermediate_values[step]:.4f}@{step}[/]"
        else:
            value = ""
        params = ", ".join(f"{k}={_short(v)}" for k, v in decode(tc.space, t.params).items())
        table.add_row(
            str(t.number),
            str(t.user_attrs.get("run", "")),
            t.state.name.lower(),
            value,
            f"{seconds:.0f}s" if seconds is not None else "",
            params,
        )
    console.print(table)


def _write_trials(trials: list[Any], path: Path) -> Path:
    import pandas as pd

    from pstage.runs import write_csv

    rows = []
    for t in trials:
        rows.append(
            {
                "number": t.number,
                "state": t.state.name,
                "value": t.value,
                "run": t.user_attrs.get("run"),
                "host": t.user_attrs.get("host"),
                "duration_s": t.duration.total_seconds() if t.duration else None,
                "last_step": max(t.intermediate_values) if t.intermediate_values else None,
                **{f"params.{k}": v for k, v in t.params.items()},
            }
        )
    write_csv(path, pd.DataFrame(rows))
    return path


def _write_best(cfg: Config, best: Any, name: str, tc: TuneConfig, path: Path) -> Path:
    from pstage.runs import write_text

    values = decode(tc.space, best.params)
    folds = f" on folds {tc.folds}" if tc.folds is not None else ""
    header = [
        f"# Best trial of study {name}: trial {best.number} (run {best.user_attrs.get('run')}), {tc.metric} {best.value:.4f}{folds}",
        f"# searched values: {', '.join(f'{k}={_short(v)}' for k, v in values.items())}",
        f"# train it as-is (every fold): pstage train --config {path.name} --name {name}-best",
    ]
    write_text(path, "\n".join(header) + "\n" + yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return path


def _importances(study: optuna.Study, n_complete: int, path: Path) -> dict[str, float] | None:
    import json

    from pstage.runs import write_text

    if n_complete < 2:
        console.print(f"importances: need at least 2 complete trials (have {n_complete})")
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            values = optuna.importance.get_param_importances(
                study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0)
            )
    except (RuntimeError, ValueError) as exc:
        console.print(f"importances: not available yet ({' '.join(str(exc).split())[:160]})")
        return None
    values = {k: round(float(v), 4) for k, v in values.items()}
    write_text(path, json.dumps(values, indent=2) + "\n")
    console.print("importances (fANOVA): " + ", ".join(f"{k} {v:.2f}" for k, v in values.items()))
    return values


def _plots(study: optuna.Study, out: Path) -> dict[str, Path]:
    """Optimization history and per-step curves (pruning shows as cut-off lines): PNG, else HTML."""
    files: dict[str, Path] = {}
    trials = study.get_trials(deepcopy=False)
    wanted = {
        "history": any(t.state == TrialState.COMPLETE for t in trials),
        "intermediate": any(t.intermediate_values for t in trials),
    }
    if not any(wanted.values()):
        return files
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from optuna.visualization import matplotlib as ovm

        verbosity = optuna.logging.get_verbosity()
        optuna.logging.set_verbosity(optuna.logging.ERROR)  # "no complete trials" notes: the table says it
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                for key, plot in (
                    ("history", ovm.plot_optimization_history),
                    ("intermediate", ovm.plot_intermediate_values),
                ):
                    if not wanted[key]:
                        continue
                    try:
                        ax = plot(study)
                    except (ValueError, RuntimeError):
                        continue
                    figure = ax.figure
                    figure.set_size_inches(8, 5)
                    figure.tight_layout()
                    figure.savefig(out / f"{key}.png", dpi=100)
                    plt.close(figure)
                    files[key] = out / f"{key}.png"
        finally:
            optuna.logging.set_verbosity(verbosity)
        return files
    except ImportError:
        pass
    try:
        import optuna.visualization as ov

        ov.plot_optimization_history(study).write_html(out / "history.html")
        files["history"] = out / "history.html"
    except ImportError:
        console.print("plots: install matplotlib (PNG) or plotly (HTML) to draw the optimization history")
    return files
