"""The ``pstage`` command: a thin typer layer over the Python API.

Only typer and rich are imported at start-up; each command imports what it needs, so
``pstage --help`` answers in a fraction of a second. Errors the user can fix print as one line.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer
from rich.console import Console

app = typer.Typer(
    name="pstage",
    help="Image-classification competitions, stage by stage: train with K-fold CV, predict, board, ensemble, demo.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err = Console(stderr=True, highlight=False)


def friendly(command: Callable[..., Any]) -> Callable[..., Any]:
    """Print PstageError (bad input, bad config, bad run) as one line and exit 2; Ctrl-C exits 130."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from pstage.errors import PstageError

        try:
            return command(*args, **kwargs)
        except PstageError as exc:
            err.print(f"[bold red]error:[/] {exc}", soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err.print("[yellow]interrupted[/]")
            raise typer.Exit(130) from None

    return wrapper


def _print_result(result: Any) -> None:
    from pstage.summary import print_run

    print_run(result.path)


@app.command(context_settings={"allow_extra_args": False})
@friendly
def train(
    overrides: list[str] | None = typer.Argument(
        None,
        metavar="[KEY=VALUE]...",
        help="Config overrides with dotted keys, e.g. train.epochs=3 model.name=resnet18 data.image_size=[128,96].",
    ),
    config: Path | None = typer.Option(
        None, "--config", "-c", help="YAML config file (defaults: configs/default.yaml)."
    ),
    data: Path | None = typer.Option(
        None, "--data", "-d", help="Competition folder, image-folder tree or CSV (path,label[,group])."
    ),
    runs: Path = typer.Option(Path("runs"), "--runs", help="Folder holding run directories."),
    name: str | None = typer.Option(
        None, "--name", "-n", help="Run name (default: <model>-<date>). The same name resumes."
    ),
) -> None:
    """Train a K-fold cross-validated run: OOF + test probabilities, submission.csv, run.json."""
    from pstage.config import load_config

    resolved = load_config(config, overrides or [])  # config errors answer before torch is imported
    from pstage.training import train as train_run

    result = train_run(resolved, data=data, runs=runs, name=name)
    if result is not None:  # None in non-zero DDP ranks
        _print_result(result)


@app.command()
@friendly
def predict(
    run: str = typer.Argument(..., help="Run directory or run name under --runs."),
    data: Path | None = typer.Option(
        None,
        "--data",
        "-d",
        help="Competition folder (re-creates submission.csv) or any folder/CSV of images (default: the run's data).",
    ),
    tta: bool = typer.Option(False, "--tta", help="Average over test-time augmentations (tta.* in the config)."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Output CSV (default: in the run directory)."),
    runs: Path = typer.Option(Path("runs"), "--runs", help="Folder holding run directories."),
) -> None:
    """Predict with a finished run's fold models."""
    from pstage.runs import resolve_run

    run_dir = resolve_run(run, runs)  # a wrong name answers before torch is imported
    from pstage.inference import predict as predict_run

    result = predict_run(run_dir, data, runs=runs, tta=tta, out=out)
    for problem in result.skipped:
        err.print(f"[yellow]warning:[/] {problem}")
    what = "submission" if result.kind == "submission" else "predictions"
    print(f"{what}: {len(result.frame):,} images -> {result.path}" + (f" (TTA: {result.tta})" if result.tta else ""))
    if result.cv_tta is not None:
        gain = result.cv_tta - result.cv
        print(
            f"CV macro F1 {result.cv:.4f} without TTA, {result.cv_tta:.4f} with TTA ({gain:+.4f}); OOF -> oof_tta.csv"
        )


@app.command()
@friendly
def board(
    runs: list[Path] = typer.Option(
        [Path("runs")], "--runs", help="Run folder(s) to list; repeat for a teammate's shared folder."
    ),
    contains: str | None = typer.Option(
        None, "--filter", "-f", help="Only runs whose name, model or user contains this text."
    ),
    sort: str = typer.Option(
        "cv", "--sort", "-s", help="cv, mask, gender, age, tta, created, duration, name, model or user (-KEY reverses)."
    ),
    html: Path | None = typer.Option(None, "--html", help="Also write the board as a self-contained HTML page."),
) -> None:
    """List finished runs, best CV first (unfinished or broken run folders are listed as skipped)."""
    from pstage.console import console
    from pstage.leaderboard import board_html, board_table, load_board

    found = load_board(runs, contains=contains, sort=sort)
    console.print(board_table(found, title="board"))
    for path, why in found.skipped:
        console.print(f"[dim]skipped {path}: {why}[/]", soft_wrap=True)
    if html is not None:
        print(f"board page -> {board_html(found, html)}")


@app.command()
@friendly
def ensemble(
    members: list[str] = typer.Argument(..., metavar="RUN RUN [RUN ...]", help="Finished runs sharing one split."),
    method: str = typer.Option(
        "hill", "--method", "-m", help="mean (soft vote), hill (greedy forward selection), stack (logistic regression)."
    ),
    name: str | None = typer.Option(
        None, "--name", "-n", help="Name of the ensemble run (default ens-<method>-<date>)."
    ),
    out: Path | None = typer.Option(None, "--out", "-o", help="Also copy the ensemble's submission.csv here."),
    calibrate: bool = typer.Option(
        False, "--calibrate", help="Fit per-class probability weights for macro F1 on OOF (scored by nested CV)."
    ),
    tta: bool = typer.Option(
        False, "--tta", help="Blend the members' TTA predictions (from pstage predict RUN --tta)."
    ),
    rounds: int = typer.Option(50, "--rounds", help="Hill climbing: selection steps (the best prefix is kept)."),
    runs: Path = typer.Option(Path("runs"), "--runs", help="Folder holding run directories."),
) -> None:
    """Blend runs on their OOF predictions; the ensemble is written as a run (board, predict, serve)."""
    from pstage.ensembling import ensemble as make_ensemble
    from pstage.summary import print_ensemble

    print_ensemble(
        make_ensemble(
            members, method=method, name=name, runs_dir=runs, out=out, calibrate=calibrate, tta=tta, rounds=rounds
        )
    )


@app.command()
@friendly
def demo(
    out: Path = typer.Option(Path("demo"), "--out", "-o", help="Folder for the demo data and runs."),
    quick: bool = typer.Option(False, "--quick", help="A much smaller, faster demo (for tests and smoke checks)."),
) -> None:
    """Generate a demo competition dataset, train two runs, predict and print a leaderboard."""
    from pstage.demo import run_demo

    run_demo(out, quick=quick)


@app.command("tune")
def tune_command(
    overrides: list[str] | None = typer.Argument(
        None, metavar="[KEY=VALUE]...", help="Config overrides with dotted keys (the base every trial starts from)."
    ),
    config: Path | None = typer.Option(
        None, "--config", "-c", help="YAML config with a tune.space section (the search space)."
    ),
    trials: int | None = typer.Option(
        None,
        "--trials",
        "-t",
        help="The study's target of finished (complete + pruned) trials, shared by every worker; re-running continues up to it.",
    ),
    storage: str | None = typer.Option(
        None,
        "--storage",
        help="Optuna storage: default sqlite:///<runs>/tune.db; an SQLAlchemy URL (postgresql://user@host/db) or a journal file (journal:PATH, *.log) to share a study across machines.",
    ),
    study: str | None = typer.Option(
        None,
        "--study",
        "-s",
        help="Study name (default: tune.study, else the config file's name); trials run as <study>-<NNN>.",
    ),
    data: Path | None = typer.Option(None, "--data", "-d", help="Competition folder, image-folder tree or CSV."),
    runs: Path = typer.Option(Path("runs"), "--runs", help="Folder for the trial runs and runs/tune/<study>/ results."),
    timeout: float | None = typer.Option(
        None, "--timeout", help="Start no new trial after this many seconds (the running one finishes)."
    ),
    backend: str = typer.Option(
        "optuna", "--backend", help="optuna (default) or ray (Ray Tune + ASHA; pip install 'pstage\\[ray]')."
    ),
    show: bool = typer.Option(
        False, "--show", help="Only report the study: best trials, best config, importances, plots."
    ),
) -> None:
    """Search hyper-parameters (tune.space) with Optuna; every completed trial is a normal run."""
    from pstage.errors import PstageError

    try:
        from pstage.config import load_config

        resolved = load_config(config, overrides or [])  # config errors answer before torch is imported
        from pstage.tuning import tune as run_tune

        run_tune(
            resolved,
            trials=trials,
            storage=storage,
            study=study or resolved.tune.study or (config.stem if config else None),
            data=data,
            runs=runs,
            timeout=timeout,
            backend=backend,
            show=show,
        )
    except PstageError as exc:  # like @friendly, with the message escaped: it may hold [brackets]
        from rich.markup import escape

        err.print(f"[bold red]error:[/] {escape(str(exc))}", soft_wrap=True)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:  # tune printed the one-line summary; the running trial is marked failed
        raise typer.Exit(130) from None


@app.command("config")
@friendly
def show_config(
    overrides: list[str] | None = typer.Argument(
        None, metavar="[KEY=VALUE]...", help="Config overrides with dotted keys."
    ),
    config: Path | None = typer.Option(None, "--config", "-c", help="YAML config file."),
) -> None:
    """Print the resolved config (defaults + file + overrides), each key with what it does."""
    from pstage.config import annotated_yaml, load_config

    print(annotated_yaml(load_config(config, overrides or [])), end="")


@app.command()
def version() -> None:
    """Print pstage's version."""
    from pstage import __version__

    print(__version__)


def main() -> None:
    app(prog_name="pstage")


if __name__ == "__main__":
    sys.exit(main())
