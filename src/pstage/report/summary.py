"""Console summaries: one run's CV (per fold, per task) and an ensemble against its members."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from rich.table import Table

from pstage.core.console import console
from pstage.runs.info import CVScores
from pstage.runs.rundir import RunDir

if TYPE_CHECKING:
    from pstage.ensembling.ensemble import EnsembleResult


def print_run(run_dir: str | Path) -> None:
    """CV macro F1 (mean ± std over folds, pooled OOF), per-fold and per-task scores, output files."""
    run_dir = Path(run_dir)
    info = RunDir(run_dir).read_info()
    cv = info.cv or CVScores()
    console.print(
        f"[bold]{info.name}[/]: CV macro F1 {_nan(cv.macro_f1):.4f} ± {_nan(cv.macro_f1_std):.4f}"
        f" (mean ± std over folds; pooled OOF {_nan(cv.oof_macro_f1):.4f})"
    )
    table = Table()
    table.add_column("fold", justify="right")
    table.add_column("macro F1", justify="right")
    table.add_column("images", justify="right")
    table.add_column("best epoch", justify="right")
    table.add_column("time", justify="right")
    for fold in cv.folds:
        best = fold.best_epoch
        table.add_row(
            str(fold.fold),
            f"{fold.macro_f1:.4f}",
            f"{fold.images:,}",
            "-" if best is None else str(best + 1),
            f"{fold.duration_s or 0:.0f}s",
        )
    table.add_row("OOF", f"{_nan(cv.oof_macro_f1):.4f}", "", "", f"{info.duration_s or 0:.0f}s", style="bold")
    console.print(table)
    if cv.per_task:
        console.print("per task macro F1: " + ", ".join(f"{head} {score:.4f}" for head, score in cv.per_task.items()))
    for skipped in info.get("skipped", [])[:5]:
        console.print(f"[yellow]skipped:[/] {skipped}")
    files = [f for f in ("submission.csv", "oof.csv", "test.csv", "run.json") if (run_dir / f).exists()]
    console.print(f"files: {run_dir}/{{{','.join(files)}}}  (TensorBoard: tensorboard --logdir {run_dir / 'logs'})")


def _folds_phrase(result: EnsembleResult) -> str:
    """``fold 0 of 5`` / ``folds 0,1 of 5``."""
    folds = result.folds
    return f"{'fold' if len(folds) == 1 else 'folds'} {','.join(map(str, folds))} of {result.split_folds}"


def _chance(beats: dict[str, float], name: str, result: EnsembleResult) -> str:
    """A member's P(beats best) cell: ``best`` for the best itself."""
    if name == (result.shakeup or {}).get("best"):
        return "best"
    return f"{beats[name]:.2f}" if name in beats else "-"


def _nan(value: float | None) -> float:
    return float("nan") if value is None else value


def print_ensemble(result: EnsembleResult) -> None:
    """Members with their folds, CV and weight, the ensemble's CV against the best member's (on the
    same folds), its bootstrap interval over persons, and P(each beats the best) on a leaderboard."""
    partial = bool(result.folds) and len(result.folds) < result.split_folds
    where = _folds_phrase(result)
    table = Table(title=f"{result.name}: {result.method} of {len(result.members_cv)} runs", title_justify="left")
    table.add_column("member")
    table.add_column("folds", justify="right")
    table.add_column("CV macro F1", justify="right")
    if partial:
        table.add_column(f"CV on {where.split(' of ')[0]}", justify="right")
    table.add_column("weight", justify="right")
    beats = (result.shakeup or {}).get("beats_best", {})
    if beats:
        table.add_column("P(beats best)", justify="right")
    for name, cv in sorted(result.members_cv.items(), key=lambda item: -item[1]):
        row = [name, ",".join(map(str, result.members_folds.get(name, []))) or "-"]
        row += [f"{result.members_own_cv.get(name, cv):.4f}"] + ([f"{cv:.4f}"] if partial else [])
        row += [f"{result.weights[name]:.3f}"]
        row += [_chance(beats, name, result)] if beats else []
        table.add_row(*row)
    console.print(table)
    best_name, best_cv = result.best_member
    cv = result.cv
    interval = result.interval
    spread = f" [{interval.low:.4f}, {interval.high:.4f}] ({interval.level:.0%} over persons)" if interval else ""
    console.print(
        f"[bold]ensemble CV macro F1 {cv['macro_f1']:.4f}[/] ± {cv['macro_f1_std']:.4f}{spread} "
        f"(best member {best_name} {best_cv:.4f}, {cv['macro_f1'] - best_cv:+.4f})"
    )
    if result.folds:
        console.print(
            f"  fitted and scored on {where} ({result.persons:,} persons, {result.images:,} images): "
            + ("the folds every member trained; the test predictions are blended whole" if partial else "every fold")
        )
    if result.method == "hill":
        console.print(
            f"  nested CV {result.nested_cv:.4f} (weights chosen without the scored fold: the honest estimate)"
        )
    elif result.method == "stack":
        console.print("  the stacker's OOF comes from nested CV (fitted without the scored fold), so its CV is honest")
    if result.calibration:
        c = result.calibration
        console.print(
            f"  per-class calibration: CV {c['cv_before']:.4f} -> {c['cv_nested']:.4f} (nested: weights fitted without the scored fold)"
        )
    if cv.get("per_task"):
        console.print("  per task macro F1: " + ", ".join(f"{h} {v:.4f}" for h, v in cv["per_task"].items()))
    if result.shakeup:
        shake = result.shakeup
        console.print(
            f"  shake-up: on a leaderboard of {shake['leaderboard']:,} {shake['unit']}, the best by CV here "
            f"({shake['best']}) is beaten by "
            + ", ".join(
                f"{name} with P={p:.2f}" for name, p in sorted(shake["beats_best"].items(), key=lambda i: -i[1])
            )
            + " (paired bootstrap over persons; the ensemble with its nested OOF)"
        )
    files = [
        f for f in ("submission.csv", "oof.csv", "test.csv", "weights.csv", "run.json") if (result.path / f).exists()
    ]
    console.print(f"files: {result.path}/{{{','.join(files)}}}")
