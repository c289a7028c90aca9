"""What a study produced, from its storage alone: the table, best.yaml, trials.csv, importances, plots."""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
import yaml
from optuna.trial import TrialState
from rich.table import Table

from pstage.config import Config, TuneConfig, load_config, merge
from pstage.core.console import console
from pstage.core.errors import RunError
from pstage.core.io import write_csv, write_text
from pstage.tuning.space import decode, nested
from pstage.tuning.study import BASE_ATTR, masked, open_storage, short_value, trial_counts

RESULTS_DIR = "tune"  # runs/tune/<study>/: best.yaml, trials.csv, importances.json, plots


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
    counts = trial_counts(study)
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
        params = ", ".join(f"{k}={short_value(v)}" for k, v in decode(tc.space, t.params).items())
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
    values = decode(tc.space, best.params)
    folds = f" on folds {tc.folds}" if tc.folds is not None else ""
    header = [
        f"# Best trial of study {name}: trial {best.number} (run {best.user_attrs.get('run')}), {tc.metric} {best.value:.4f}{folds}",
        f"# searched values: {', '.join(f'{k}={short_value(v)}' for k, v in values.items())}",
        f"# train it as-is (every fold): pstage train --config {path.name} --name {name}-best",
    ]
    write_text(path, "\n".join(header) + "\n" + yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return path


def _importances(study: optuna.Study, n_complete: int, path: Path) -> dict[str, float] | None:
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
        import matplotlib  # deferred: Agg is picked (below) before pyplot loads, and only for these plots

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # deferred: after the Agg backend is picked (above)
        from optuna.visualization import matplotlib as ovm  # deferred: imports pyplot, so after Agg is set

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
        import optuna.visualization as ov  # fallback: optuna's plotly plots (plotly is not a dependency; ImportError skips them)

        ov.plot_optimization_history(study).write_html(out / "history.html")
        files["history"] = out / "history.html"
    except ImportError:
        console.print("plots: install matplotlib (PNG) or plotly (HTML) to draw the optimization history")
    return files
