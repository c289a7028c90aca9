"""The shared study: storage URL (SQLite, RDB, journal), name, seeded sampler, pruner, trial states."""

from __future__ import annotations

import fcntl
import importlib.util
import os
import re
import socket
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
from optuna.storages.journal import JournalFileBackend, JournalStorage
from optuna.trial import TrialState

from pstage.config import Config, TuneConfig, diff_configs
from pstage.core.errors import ConfigError, RunError
from pstage.core.registry import Registry
from pstage.runs.rundir import RunDir
from pstage.tuning.space import flow

BASE_ATTR = "pstage.base_config"  # study user attr: the base config every trial starts from
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


WORKER = f"{socket.gethostname()}:{os.getpid()}"  # marks this process's trials (Ctrl-C clean-up)
FAIL_STREAK = 3  # a worker stops after this many failed trials in a row (a broken setup, not bad luck)


def mark_trial(run_dir: Path, study: str, number: int) -> None:
    """Record in a finished trial's run.json that it is a tune trial (kind ``trial``) and which one."""
    run = RunDir(run_dir)
    with run.lock():
        run.update_info(kind="trial", trial={"study": study, "number": number})


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


def open_storage(url: str, heartbeat: tuple[int, int] = (30, 180)) -> optuna.storages.BaseStorage:
    """An Optuna storage for the URL; a storage that cannot be opened is one ConfigError line.

    RDB storages get a heartbeat (``heartbeat`` = (interval, grace) seconds: tune.heartbeat_interval,
    tune.heartbeat_grace), so a trial whose worker died (power cut, SIGKILL) turns FAIL after the
    grace instead of counting as running forever. SQLite waits up to 60 s for a lock (several
    workers on one machine). Journal files take locks of their own (also on NFS).
    """
    try:
        if _is_journal(url):
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
        return _rdb_storage(_with_driver(url), engine_kwargs, heartbeat)
    except Exception as exc:
        reason = getattr(exc, "orig", None) or exc
        text = " ".join(str(reason).split())[:240]
        if isinstance(exc, ImportError):
            hint = "install the database driver: pip install 'pstage[postgres]' (psycopg), or pymysql for MySQL"
        elif url.startswith("sqlite") or _is_journal(url):
            hint = "check the path (its folder must exist and be writable)"
        else:
            hint = "check the URL, the credentials and that the server is reachable from here"
        raise ConfigError(
            f"--storage {masked(url)}: cannot open it ({type(reason).__name__}: {text}); {hint}"
        ) from None


def _with_driver(url: str) -> str:
    """``postgresql://`` spelled with the PostgreSQL driver that is installed.

    SQLAlchemy picks a default driver by its own version (psycopg2 before 2.1, psycopg 3 since), so a
    bare URL fails whenever the other one is installed; pstage's ``postgres`` extra installs psycopg 3.
    """
    if not url.startswith("postgresql://"):
        return url

    for module, driver in (("psycopg", "psycopg"), ("psycopg2", "psycopg2")):
        if importlib.util.find_spec(module) is not None:
            return url.replace("postgresql://", f"postgresql+{driver}://", 1)
    return url


def _rdb_storage(url: str, engine_kwargs: dict[str, Any], heartbeat: tuple[int, int]) -> optuna.storages.RDBStorage:
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
                        url, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat[0], grace_period=heartbeat[1]
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


# tune.pruner by name: a factory (tune config, the longest trial's steps) -> an Optuna pruner.
PRUNERS: Registry[Callable[[TuneConfig, int], optuna.pruners.BasePruner]] = Registry("pruner", "tune.pruner")


@PRUNERS.register("median")
def _median(tc: TuneConfig, steps: int) -> optuna.pruners.BasePruner:
    """Below the median of earlier trials at the same step."""
    return optuna.pruners.MedianPruner(n_startup_trials=tc.pruner_startup_trials, n_warmup_steps=tc.pruner_warmup_steps)


@PRUNERS.register("halving")
def _halving(tc: TuneConfig, steps: int) -> optuna.pruners.BasePruner:
    """Successive halving."""
    return optuna.pruners.SuccessiveHalvingPruner(min_resource=max(1, tc.pruner_warmup_steps), reduction_factor=3)


@PRUNERS.register("hyperband")
def _hyperband(tc: TuneConfig, steps: int) -> optuna.pruners.BasePruner:
    """Hyperband over up to ``steps`` steps."""
    return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(steps, 1), reduction_factor=3)


@PRUNERS.register("threshold")
def _threshold(tc: TuneConfig, steps: int) -> optuna.pruners.BasePruner:
    """Below tune.prune_below after the warm-up steps."""
    return optuna.pruners.ThresholdPruner(lower=tc.prune_below, n_warmup_steps=tc.pruner_warmup_steps)


@PRUNERS.register("none")
def _no_pruning(tc: TuneConfig, steps: int) -> optuna.pruners.BasePruner:
    """Every trial runs to the end."""
    return optuna.pruners.NopPruner()


def make_pruner(tc: TuneConfig, steps: int) -> optuna.pruners.BasePruner:
    """The Optuna pruner tune.pruner names."""
    return PRUNERS.create(tc.pruner, tc, steps)


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


def metric_value(cv: dict[str, Any], metric: str) -> float:
    """The objective from a run's ``cv`` summary (``per_task.age`` reads cv["per_task"]["age"])."""
    node: Any = cv
    for part in metric.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    if node is None:
        heads = ", ".join(cv.get("per_task") or {}) or "none"
        raise ConfigError(f"tune.metric {metric}: not in this task's CV (heads: {heads}); use macro_f1")
    return float(node)


def live_running(study: optuna.Study, heartbeat: bool) -> int:
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


def trial_counts(study: optuna.Study) -> dict[str, int]:
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


def short_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return flow(value) if isinstance(value, (list, tuple, dict)) else str(value)
