"""Console summaries of runs: one run's CV (per fold, per task) and a leaderboard of several."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from rich.table import Table

from pstage.console import console
from pstage.runs import load_run_info


def print_run(run_dir: str | Path) -> None:
    """CV macro F1 (mean ± std over folds, pooled OOF), per-fold and per-task scores, output files."""
    run_dir = Path(run_dir)
    info = load_run_info(run_dir)
    cv = info.get("cv") or {}
    console.print(
        f"[bold]{info['name']}[/]: CV macro F1 {cv.get('macro_f1', float('nan')):.4f} ± {cv.get('macro_f1_std', float('nan')):.4f}"
        f" (mean ± std over folds; pooled OOF {cv.get('oof_macro_f1', float('nan')):.4f})"
    )
    table = Table()
    table.add_column("fold", justify="right")
    table.add_column("macro F1", justify="right")
    table.add_column("images", justify="right")
    table.add_column("best epoch", justify="right")
    table.add_column("time", justify="right")
    for fold in cv.get("folds", []):
        best = fold.get("best_epoch")
        table.add_row(
            str(fold["fold"]),
            f"{fold['macro_f1']:.4f}",
            f"{fold['images']:,}",
            "-" if best is None else str(best + 1),
            f"{fold.get('duration_s') or 0:.0f}s",
        )
    table.add_row(
        "OOF", f"{cv.get('oof_macro_f1', float('nan')):.4f}", "", "", f"{info.get('duration_s', 0):.0f}s", style="bold"
    )
    console.print(table)
    if cv.get("per_task"):
        console.print(
            "per task macro F1: " + ", ".join(f"{head} {score:.4f}" for head, score in cv["per_task"].items())
        )
    for skipped in info.get("skipped", [])[:5]:
        console.print(f"[yellow]skipped:[/] {skipped}")
    files = [f for f in ("submission.csv", "oof.csv", "test.csv", "run.json") if (run_dir / f).exists()]
    console.print(f"files: {run_dir}/{{{','.join(files)}}}  (TensorBoard: tensorboard --logdir {run_dir / 'logs'})")


def leaderboard(run_dirs: Sequence[str | Path], title: str = "leaderboard") -> Table:
    """A table of runs, best CV first."""
    rows = []
    for run_dir in run_dirs:
        info = load_run_info(run_dir)
        if info.get("status") == "done":
            rows.append(info)
    rows.sort(key=lambda i: -i["cv"]["macro_f1"])
    table = Table(title=title, title_justify="left")
    for column, justify in [
        ("#", "right"),
        ("run", "left"),
        ("model", "left"),
        ("size", "left"),
        ("epochs", "right"),
        ("CV macro F1", "right"),
        ("mask", "right"),
        ("gender", "right"),
        ("age", "right"),
        ("time", "right"),
    ]:
        table.add_column(column, justify=justify)
    for rank, info in enumerate(rows, start=1):
        cv, per = info["cv"], info["cv"].get("per_task", {})
        size = "x".join(map(str, info.get("image_size", [])))
        table.add_row(
            str(rank),
            info["name"],
            info.get("model", "?"),
            size,
            str(info.get("epochs", "")),
            f"{cv['macro_f1']:.4f} ± {cv['macro_f1_std']:.3f}",
            *(f"{per[h]:.3f}" if h in per else "-" for h in ("mask", "gender", "age")),
            f"{info.get('duration_s', 0):.0f}s",
        )
    return table
