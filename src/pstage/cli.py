"""The ``pstage`` command: a thin typer layer over the Python API.

Only typer and rich are imported at start-up; each command imports what it needs, so
``pstage --help`` answers in a fraction of a second. Errors the user can fix print as one line.
"""

from __future__ import annotations

import functools
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from typer._click.exceptions import ClickException, NoArgsIsHelpError  # typer 0.29 vendors click: no public alias
from typer.core import TyperGroup

from pstage import __version__
from pstage.core.console import console
from pstage.core.errors import PstageError

err = Console(stderr=True, highlight=False)


def say_error(message: str) -> None:
    """The CLI's one error line, markup escaped (a message may hold ``pip install 'pstage[serve]'``)."""
    err.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)


class OneLineErrors(TyperGroup):
    """The command group whose usage errors (an unknown option, a missing argument, a bad choice)
    are one ``error:`` line, exit 2, like every other error, instead of click's usage block and
    boxed panel. Help (``pstage`` alone, ``--help``) is printed as click prints it."""

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except NoArgsIsHelpError as exc:
            exc.show()
            sys.exit(exc.exit_code)
        except ClickException as exc:
            ctx = getattr(exc, "ctx", None)
            hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
            say_error(exc.format_message() + hint)
            sys.exit(exc.exit_code)
        except typer.Abort:
            err.print("[yellow]aborted[/]")
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(
    name="pstage",
    cls=OneLineErrors,
    help="Image-classification competitions, stage by stage: eda, train (K-fold CV), predict, board, ensemble, lb (public scores), tune, report, export/serve, distill, demo.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
STARTED = time.time()  # the command's start: train.time counts from here (imports included)


def friendly(command: Callable[..., Any] | None = None, *, say_interrupted: bool = True) -> Any:
    """The CLI's one error funnel: PstageError (bad input, bad config, bad run) prints as one line,
    markup escaped (a message may hold ``pip install 'pstage[serve]'``), and exits 2; Ctrl-C exits
    130, saying "interrupted" unless the command already said what it stopped (``say_interrupted``)."""

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(command)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return command(*args, **kwargs)
            except PstageError as exc:
                say_error(str(exc))
                raise typer.Exit(2) from None
            except KeyboardInterrupt:
                if say_interrupted:
                    err.print("[yellow]interrupted[/]")
                raise typer.Exit(130) from None

        return wrapper

    return decorate(command) if command is not None else decorate


def _print_result(result: Any) -> None:
    from pstage.report.summary import print_run  # deferred: keeps pandas off pstage --help

    print_run(result.path)


STORE_HELP = "Team store: an MLflow tracking server, http://HOST:PORT (default: $PSTAGE_STORE)."


def _store_option() -> Any:
    return typer.Option(None, "--store", envvar="PSTAGE_STORE", help=STORE_HELP, show_envvar=False)


def _trust_option() -> Any:
    return typer.Option(
        False,
        "--trust",
        help="Load fold checkpoints that hold pickled objects (code) if the run was made on this machine; never a pulled run's.",
    )


def _checked_store(store: str | None) -> str | None:
    """A malformed store address stops at once (before any training); None means no store."""
    from pstage.runs.store import store_uri  # deferred: keeps pandas off pstage --help

    return store_uri(store)


def _early(run: str, runs: Path, store: str | None) -> str | None:
    """Check the store address, and without a store the run's name, before torch is imported.

    With a store the command's function pulls what it needs (``store=``: the API's one code path)."""
    from pstage.runs.rundir import resolve_run  # deferred: keeps pandas off pstage --help

    store = _checked_store(store)
    if not store:
        resolve_run(run, runs)  # a wrong name answers at once
    return store


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
    store: str | None = _store_option(),
    with_checkpoints: bool = typer.Option(
        False, "--with-checkpoints", help="Publish the fold checkpoints too (teammates can predict, export, serve)."
    ),
) -> None:
    """Train a K-fold cross-validated run: OOF + test probabilities, submission.csv, run.json."""
    from pstage.config import load_config  # deferred: keeps pydantic off pstage --help

    store = _checked_store(store)
    resolved = load_config(config, overrides or [])  # config errors answer before torch is imported
    from pstage.training.train import train as train_run  # deferred: keeps torch off pstage --help

    result = train_run(
        resolved, data=data, runs=runs, name=name, started=STARTED, store=store, with_checkpoints=with_checkpoints
    )
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
    store: str | None = _store_option(),
    trust: bool = _trust_option(),
) -> None:
    """Predict with a finished run's fold models (a teammate's published run is pulled first)."""
    store = _early(run, runs, store)
    from pstage.inference.predict import predict as predict_run  # deferred: keeps torch off pstage --help

    result = predict_run(run, data, runs=runs, tta=tta, out=out, store=store, trust=trust)
    for problem in result.skipped:
        err.print(f"[yellow]warning:[/] {escape(problem)}")
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
    runs: list[Path] | None = typer.Option(
        None, "--runs", help="Run folder(s) to list (default ./runs); repeat for a teammate's shared folder."
    ),
    contains: str | None = typer.Option(
        None, "--filter", "-f", help="Only runs whose name, model or user contains this text."
    ),
    sort: str = typer.Option(
        "cv", "--sort", "-s", help="cv, mask, gender, age, tta, created, duration, name, model or user (-KEY reverses)."
    ),
    html: Path | None = typer.Option(
        None, "--html", help="Also write the board as a self-contained HTML page (with the public-leaderboard plot)."
    ),
    store: str | None = _store_option(),
    shakeup: bool | None = typer.Option(
        None,
        "--shakeup/--no-shakeup",
        help="CV intervals over persons and P(beats the best) on a leaderboard (default: on with --html).",
    ),
    lb_persons: int | None = typer.Option(
        None, "--lb-persons", help="Leaderboard size for --shakeup (default: the test set's; mask task: images / 7)."
    ),
    top: int = typer.Option(5, "--top", help="--shakeup: P(beats the best) for this many runs after the best."),
) -> None:
    """List finished runs, best CV first (unfinished or broken run folders are listed as skipped)."""
    # deferred: keeps pandas off pstage --help
    from pstage.report.board import board_html, board_table, load_board, shakeup_line

    shakeup = html is not None if shakeup is None else shakeup
    found = load_board(runs, contains=contains, sort=sort, store=store, shakeup=shakeup, lb_persons=lb_persons, top=top)
    console.print(board_table(found, title="board"))
    line = shakeup_line(found)
    if line:
        console.print(f"[dim]{escape(line)}[/]", soft_wrap=True)
    for path, why in found.skipped:
        console.print(f"[dim]skipped {escape(str(path))}: {escape(why)}[/]", soft_wrap=True)
    if html is not None:
        print(f"board page -> {board_html(found, html)}")


@app.command()
@friendly
def push(
    run: str = typer.Argument(..., help="Finished run directory or run name under --runs."),
    store: str = typer.Option(..., "--store", envvar="PSTAGE_STORE", help=STORE_HELP, show_envvar=False),
    with_checkpoints: bool = typer.Option(
        False, "--with-checkpoints", help="Publish the fold checkpoints too (teammates can predict, export, serve)."
    ),
    runs: Path = typer.Option(Path("runs"), "--runs", help="Folder holding run directories."),
) -> None:
    """Publish a finished run to the team store (again: only what changed; completes an interrupted publish)."""
    from pstage.runs.store import publish  # deferred: keeps pandas off pstage --help

    done = publish(run, _checked_store(store) or "", runs_dir=runs, checkpoints=with_checkpoints)
    what = "unchanged" if done.unchanged else f"{done.uploaded} file(s) uploaded"
    print(f"published {done.name} ({what}) -> {done.url}")


@app.command()
@friendly
def pull(
    run: str = typer.Argument(..., help="A published run: user/name, a name only one teammate has, or its uid."),
    store: str = typer.Option(..., "--store", envvar="PSTAGE_STORE", help=STORE_HELP, show_envvar=False),
    with_checkpoints: bool = typer.Option(
        False, "--with-checkpoints", help="Fetch the fold checkpoints too (needed by predict, export, serve, report)."
    ),
    runs: Path = typer.Option(Path("runs"), "--runs", help="Local runs folder; the run lands in RUNS/<user>/<name>."),
) -> None:
    """Copy a teammate's published run into the local runs folder (checksummed, resumable, cached)."""
    from pstage.runs.store import pull as pull_run  # deferred: keeps pandas off pstage --help

    path, fetched = pull_run(run, _checked_store(store) or "", runs, checkpoints=with_checkpoints)
    print(f"{path} ({fetched} file(s) downloaded)" if fetched else f"{path} (up to date)")


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
    store: str | None = _store_option(),
    with_checkpoints: bool = typer.Option(
        False,
        "--with-checkpoints",
        help="With --store: publish the fold checkpoints of the ensemble's own members (teammates can export, serve).",
    ),
    lb_persons: int | None = typer.Option(
        None, "--lb-persons", help="Leaderboard size for the shake-up (default: the test set's; mask task: images / 7)."
    ),
) -> None:
    """Blend runs on their OOF predictions; the ensemble is written as a run (board, predict, serve).

    With --store, members that are not in --runs are pulled from the team store (user/name or a
    name), and the ensemble is published there with its own members that are not yet.
    """
    from pstage.ensembling.ensemble import ensemble as make_ensemble  # deferred: keeps pandas off pstage --help
    from pstage.report.summary import print_ensemble  # deferred: keeps pandas off pstage --help

    result = make_ensemble(
        members,
        method=method,
        name=name,
        runs_dir=runs,
        out=out,
        calibrate=calibrate,
        tta=tta,
        rounds=rounds,
        store=store,
        with_checkpoints=with_checkpoints,
        lb_persons=lb_persons,
    )
    print_ensemble(result)


@app.command("lb")
@friendly
def log_public_score(
    run: str = typer.Argument(..., help="Your finished run (or ensemble) whose submission.csv you uploaded."),
    score: str = typer.Argument(..., help="Its public-leaderboard macro F1, e.g. 0.7421."),
    note: str | None = typer.Option(None, "--note", help="A few words to keep with the score."),
    tta: bool = typer.Option(False, "--tta", help="The score is for submission_tta.csv (pstage predict --tta)."),
    runs: Path = typer.Option(Path("runs"), "--runs", help="Folder holding run directories."),
    store: str | None = _store_option(),
) -> None:
    """Log a public-leaderboard score for a run's submission (run.json; with --store, the team sees it)."""
    from pstage.runs.public_lb import log_score  # deferred: keeps pandas off pstage --help

    done = log_score(run, score, runs_dir=runs, store=store, note=note, tta=tta)
    entry = done.entry
    cv = "" if entry.cv is None else f" (CV {entry.cv:.4f}, {entry.score - entry.cv:+.4f})"
    print(
        f"{done.run}: public {entry.score:.4f}{cv} logged as score {done.count} of {entry.file} -> {done.path / 'run.json'}"
    )
    if done.published is None and not store:
        print(f"share it: pstage push {done.run} --store URI (or log with --store)")


@app.command()
@friendly
def eda(
    data: Path = typer.Option(..., "--data", "-d", help="Competition folder, image-folder tree or CSV."),
    out: Path = typer.Option(Path("eda.html"), "--out", "-o", help="Where to write the page."),
    config: Path | None = typer.Option(None, "--config", "-c", help="YAML config (age thresholds, face margin)."),
) -> None:
    """Write an HTML page of the data: counts, ages, sizes, samples, near-duplicates, face crops."""
    from pstage.config import load_config  # deferred: keeps pydantic off pstage --help

    load_config(config, [])  # config errors answer before the heavy imports
    from pstage.report.eda import eda as run_eda  # deferred: keeps pandas off pstage --help

    result = run_eda(data, out, config=config)
    for problem in result.problems[:3]:
        err.print(f"[yellow]data problem:[/] {escape(problem)}", soft_wrap=True)
    rate = (
        ""
        if result.face_hit_rate is None
        else f", face found in {result.face_hit_rate:.0%} of sampled photos by {result.face_detector}"
    )
    print(
        f"EDA of {result.images:,} images / {result.persons:,} persons ({len(result.problems)} problem(s), "
        f"{len(result.duplicates)} near-duplicate pair(s) across persons{rate}) in {result.seconds:.1f}s -> {result.path}"
    )


@app.command()
@friendly
def report(
    run: str = typer.Argument(..., help="Run directory or run name under --runs."),
    audit: bool = typer.Option(
        False, "--audit", help="Add the label-issue audit (cleanlab, person-aware) and write audit/*.csv."
    ),
    relabel: Path | None = typer.Option(
        None,
        "--relabel",
        help="A corrections CSV (e.g. an edited audit/corrections.csv) -> a label override file for data.relabel.",
    ),
    out: Path | None = typer.Option(None, "--out", "-o", help="Where to write the page (default RUN/report.html)."),
    runs: Path = typer.Option(Path("runs"), "--runs", help="Folder holding run directories."),
    store: str | None = _store_option(),
    trust: bool = _trust_option(),
) -> None:
    """Write RUN/report.html: CV per fold, curves, confusion matrices, per-class F1, mistakes with Grad-CAM."""
    from pstage.runs.rundir import Run, resolve_run  # deferred: keeps pandas off pstage --help
    from pstage.runs.store import locate  # deferred: keeps pandas off pstage --help

    run_dir = resolve_run(locate(run, runs, store, checkpoints=relabel is None), runs)
    if relabel is not None:
        from pstage.report.audit import relabel as make_overrides  # deferred: keeps pandas off pstage --help

        loaded = Run(run_dir)
        path, count = make_overrides(loaded, relabel, loaded.task)
        print(f"{count} correction(s) checked -> {path}")
        print(
            f"train with them: pstage train --config {run_dir / 'config.yaml'} --name {loaded.name}-relabel data.relabel={path}"
        )
        return
    from pstage.report.report import report as run_report  # deferred: keeps pandas off pstage --help

    result = run_report(run_dir, runs=runs, audit=audit, out=out, trust=trust)
    if result.audit is not None:
        print(f"audit: {len(result.audit.suspects)} suspect image(s), files in {result.audit.folder}")
    print(f"report in {result.seconds:.1f}s -> {result.path}")


@app.command()
@friendly
def demo(
    out: Path = typer.Option(Path("demo"), "--out", "-o", help="Folder for the demo data and runs."),
    quick: bool = typer.Option(False, "--quick", help="A much smaller, faster demo (for tests and smoke checks)."),
) -> None:
    """Generate a demo competition dataset, train two runs, TTA, ensemble, board, EDA and report pages."""
    from pstage.demo import run_demo  # deferred: keeps pandas and OpenCV off pstage --help

    run_demo(out, quick=quick)


@app.command("tune")
@friendly(say_interrupted=False)  # tune prints which trial it marked failed
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
    store: str | None = _store_option(),
) -> None:
    """Search hyper-parameters (tune.space) with Optuna; every completed trial is a normal run."""
    from pstage.config import load_config  # deferred: keeps pydantic off pstage --help

    store = None if show else _checked_store(store)
    resolved = load_config(config, overrides or [])  # config errors answer before torch is imported
    from pstage.tuning.tune import tune as run_tune  # deferred: keeps pandas and Optuna off pstage --help

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
        store=store,
    )


@app.command("config")
@friendly
def show_config(
    overrides: list[str] | None = typer.Argument(
        None, metavar="[KEY=VALUE]...", help="Config overrides with dotted keys."
    ),
    config: Path | None = typer.Option(None, "--config", "-c", help="YAML config file."),
) -> None:
    """Print the resolved config (defaults + file + overrides), each key with what it does."""
    from pstage.config import annotated_yaml, load_config  # deferred: keeps pydantic off pstage --help

    print(annotated_yaml(load_config(config, overrides or [])), end="")


@app.command("export")
@friendly
def export_command(
    run: str = typer.Argument(..., help="Run or ensemble directory, or a name under --runs."),
    format: str = typer.Option("onnx", "--format", "-f", help="Export format (onnx)."),
    int8: bool = typer.Option(
        False,
        "--int8",
        help="Also write model.int8.onnx (static int8, calibrated on training images) and score it on OOF.",
    ),
    data: Path | None = typer.Option(
        None, "--data", "-d", help="The training data (default: the run's data.path); needed by --int8 and --score."
    ),
    score: bool = typer.Option(
        False, "--score", help="Score the fp32 graph on the run's OOF images too (without --int8)."
    ),
    out: Path | None = typer.Option(None, "--out", "-o", help="Export folder (default: <run>/export)."),
    runs: Path = typer.Option(Path("runs"), "--runs", help="Folder holding run directories."),
    store: str | None = _store_option(),
    trust: bool = _trust_option(),
) -> None:
    """Export a run (all fold models) or an ensemble (with its weights) to one ONNX graph + preprocess.json."""
    store = _early(run, runs, store)
    from pstage.deploy.export import export  # deferred: keeps torch off pstage --help

    result = export(
        run, runs=runs, format=format, int8=int8, data=data, out=out, score=score or None, store=store, trust=trust
    )
    size = result.sizes.get("model.onnx", 0) / 2**20
    print(f"{result.path} ({size:.1f} MiB; max |ONNX - PyTorch| = {result.parity_max_abs_diff:.1e})")
    print(f"{result.preprocess}")
    if result.int8_path is not None:
        print(f"{result.int8_path} ({result.sizes.get('model.int8.onnx', 0) / 2**20:.1f} MiB)")
    if "onnx_fp32" in result.oof:
        line = f"OOF macro F1: run CV {result.oof['run_cv']:.4f}, ONNX fp32 {result.oof['onnx_fp32']:.4f}"
        if result.int8_change is not None:
            line += f", int8 {result.oof['onnx_int8']:.4f} ({result.int8_change:+.4f})"
        print(line)


@app.command("serve")
@friendly
def serve_command(
    run: str = typer.Argument(..., help="Run or ensemble directory, or a name under --runs."),
    host: str = typer.Option("127.0.0.1", "--host", help="Interface to bind (0.0.0.0 exposes it to the network)."),
    port: int = typer.Option(8000, "--port", "-p", help="TCP port."),
    api_key: str | None = typer.Option(
        None, "--api-key", envvar="PSTAGE_API_KEY", help="Require this key (X-API-Key header); or set PSTAGE_API_KEY."
    ),
    backend: str = typer.Option(
        "auto", "--backend", help="auto (ONNX if exported, else PyTorch), onnx, int8 or pytorch."
    ),
    max_body_mb: float = typer.Option(50.0, "--max-body-mb", help="Largest request body (MiB)."),
    max_file_mb: float = typer.Option(20.0, "--max-file-mb", help="Largest image file (MiB)."),
    max_pixels: int = typer.Option(40_000_000, "--max-pixels", help="Largest image (width x height, from its header)."),
    max_images: int = typer.Option(64, "--max-images", help="Most images per request."),
    max_batch: int = typer.Option(32, "--max-batch", help="Most images the model runs at once across requests."),
    runs: Path = typer.Option(Path("runs"), "--runs", help="Folder holding run directories."),
    store: str | None = _store_option(),
    trust: bool = _trust_option(),
) -> None:
    """Serve a run over HTTP: POST /predict, GET /health, GET /model, docs at /docs."""
    store = _early(run, runs, store)
    from pstage.deploy.export import require  # deferred: keeps torch off pstage --help

    require("fastapi", "uvicorn", "multipart", "onnxruntime")
    from pstage.deploy.serve import Limits, serve  # deferred: keeps FastAPI and pandas off pstage --help

    limits = Limits(int(max_body_mb * 2**20), int(max_file_mb * 2**20), max_pixels, max_images)
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        err.print(f"[yellow]warning:[/] serving on {host} without --api-key: anyone who can reach it can use it")

    def ready(served: Any) -> None:
        print(f"serving {served.run} ({served.backend}) on http://{host}:{port} (docs: /docs)", flush=True)

    serve(
        run,
        runs=runs,
        host=host,
        port=port,
        api_key=api_key,
        backend=backend,
        limits=limits,
        max_batch=max_batch,
        on_ready=ready,
        store=store,
        trust=trust,
    )


@app.command("distill")
@friendly
def distill_command(
    teacher: str = typer.Argument(..., help="Teacher run or ensemble (its OOF probabilities are the soft labels)."),
    overrides: list[str] | None = typer.Argument(
        None, metavar="[KEY=VALUE]...", help="Student config overrides, e.g. model.name=resnet18 train.epochs=10."
    ),
    name: str | None = typer.Option(None, "--name", "-n", help="Student run name (default: <teacher>-student)."),
    data: Path | None = typer.Option(None, "--data", "-d", help="Training data (default: the teacher's data.path)."),
    temperature: float | None = typer.Option(None, "--temperature", "-T", help="KD temperature (distill.temperature)."),
    alpha: float | None = typer.Option(None, "--alpha", help="Weight of the KD term vs hard labels (distill.alpha)."),
    runs: Path = typer.Option(Path("runs"), "--runs", help="Folder holding run directories."),
    store: str | None = _store_option(),
    trust: bool = _trust_option(),
) -> None:
    """Train one student run on a teacher's (ensemble's) OOF soft labels, on the teacher's exact split."""
    store = _early(teacher, runs, store)
    from pstage.distillation import distill  # deferred: keeps torch off pstage --help

    result = distill(
        teacher,
        name=name,
        data=data,
        runs=runs,
        overrides=overrides or [],
        temperature=temperature,
        alpha=alpha,
        store=store,
        trust=trust,
    )
    _print_result(result.student)
    print(
        f"teacher {result.teacher} CV {result.teacher_cv:.4f} -> student {result.student.name} CV {result.student_cv:.4f} "
        f"({result.student_cv - result.teacher_cv:+.4f}); speed {result.teacher_ips:,.0f} -> {result.student_ips:,.0f} img/s "
        f"({result.student_ips / max(result.teacher_ips, 1e-9):.1f}x)"
    )


@app.command()
def version() -> None:
    """Print pstage's version."""
    print(__version__)


def main() -> None:
    app(prog_name="pstage")


if __name__ == "__main__":
    sys.exit(main())
