"""``pstage demo``: the whole flow on generated data in a few minutes on 2 CPU cores.

Generates a dataset in the competition layout, trains two cross-validated runs with different
models, re-creates the best run's submission from its checkpoints with TTA (measuring its gain on
OOF), blends the runs by hill climbing, and prints the board with CV macro F1 and the score on the
hidden test truth (the "private leaderboard").
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from pstage.core.console import console
from pstage.core.errors import ConfigError
from pstage.core.metrics import macro_f1
from pstage.demo.synthetic import TRUTH_FILE, make_demo_data
from pstage.ensembling.ensemble import ensemble
from pstage.inference.predict import predict
from pstage.report.board import board_table, load_board
from pstage.report.eda import eda
from pstage.report.report import report
from pstage.report.summary import print_ensemble
from pstage.training.train import train


@dataclass(frozen=True)
class DemoPlan:
    """How big the demo is: data, shared settings, and the runs to compare."""

    persons: int
    eval_persons: int
    source_size: tuple[int, int]
    common: list[str]
    runs: dict[str, list[str]]


# Chosen by measurement on 2 CPU cores: the default 64x48 input and timm's two fastest learners
# on the demo data (test_resnet: fold macro F1 0.57 in 41 s, test_byobnet 0.39 in 20 s; resnet10t,
# the default model, needs 100 s a fold) keep the demo near 3.5 minutes and far above chance (1/18).
# Both runs share the split (3 folds), so they can be compared and ensembled.
FULL = DemoPlan(
    persons=300,
    eval_persons=60,
    source_size=(512, 384),
    common=[
        "split.folds=3",
        "train.epochs=15",
        "data.image_size=[64,48]",
        "augment.preset=basic",
        "loss.label_smoothing=0",
        "tta.train=false",  # the demo's last step shows what `pstage predict --tta` adds
    ],  # tiny models from scratch on drawn faces: minutes; the real-photo defaults (128x128, strong) were measured for pretrained models
    runs={"test-resnet": ["model.name=test_resnet"], "test-byobnet": ["model.name=test_byobnet"]},
)
QUICK = DemoPlan(
    persons=30,
    eval_persons=6,
    source_size=(64, 48),
    common=["data.image_size=[32,24]", "split.folds=2", "train.epochs=2", "train.progress=epoch", "tta.train=false"],
    runs={"resnet10t": ["model.name=resnet10t"], "test-resnet": ["model.name=test_resnet"]},
)


@dataclass
class DemoResult:
    """Where the demo put things and how each run scored."""

    data: Path
    runs: Path
    leaderboard: pd.DataFrame
    seconds: float
    files: dict[str, Path] = field(default_factory=dict)


def score_on_truth(run_dir: Path, truth: pd.DataFrame) -> dict[str, float]:
    """Macro F1 of a run's submission on the hidden demo truth, overall and per head."""
    submission = pd.read_csv(run_dir / "submission.csv").merge(truth, on="ImageID", suffixes=("", "_true"))
    pred, true = submission["ans"].to_numpy(), submission["ans_true"].to_numpy()
    return {
        "test": macro_f1(true, pred),
        "mask": macro_f1(true // 6, pred // 6),
        "gender": macro_f1(true // 3 % 2, pred // 3 % 2),
        "age": macro_f1(true % 3, pred % 3),
    }


def run_demo(out: str | Path = "demo", quick: bool = False) -> DemoResult:
    """Generate data, train two runs, predict with TTA, ensemble, and print the board; returns what it made."""
    plan = QUICK if quick else FULL
    out = Path(out).expanduser().resolve()
    blocker = next((p for p in (out, *out.parents) if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise ConfigError(f"--out {out}: {blocker} is a file, not a folder; pass a folder for the demo data and runs")
    started = time.time()
    console.rule("[bold]pstage demo")
    data = make_demo_data(
        out / "data", persons=plan.persons, eval_persons=plan.eval_persons, image_size=plan.source_size, seed=0
    )
    console.print(
        f"data: {plan.persons} persons x 7 photos ({plan.source_size[1]}x{plan.source_size[0]}) + {plan.eval_persons * 7} test photos in the competition layout -> {data}"
    )
    results = []
    for name, overrides in plan.runs.items():
        console.rule(f"train {name}")
        results.append(train(data=data, runs=out / "runs", name=name, overrides=[*plan.common, *overrides]))
    best = max(results, key=lambda r: r.cv["macro_f1"])
    console.rule("predict with TTA")
    prediction = predict(best.path, data, tta=True)
    console.print(
        f"re-created {best.name}'s submission from its fold checkpoints with TTA ({prediction.tta}): "
        f"CV macro F1 {prediction.cv:.4f} -> {prediction.cv_tta:.4f} -> {prediction.path}"
    )
    console.rule("ensemble")
    blended = ensemble([r.path for r in results], method="hill", name="ensemble", runs_dir=out / "runs")
    print_ensemble(blended)

    truth = pd.read_csv(data / TRUTH_FILE)
    names = [r.name for r in results] + [blended.name]
    hidden = {name: score_on_truth(out / "runs" / name, truth) for name in names}
    found = load_board(out / "runs")
    console.print(
        board_table(
            found,
            title="board (CV = out-of-fold macro F1; test = the hidden demo truth, like a private leaderboard)",
            extra={name: {"test macro F1": f"{scores['test']:.4f}"} for name, scores in hidden.items()},
        )
    )
    board = found.runs[["name", "cv", "cv_std", "mask", "gender", "age", "duration_s"]].rename(
        columns={"name": "run", "cv": "cv_macro_f1", "duration_s": "seconds"}
    )
    board["test_macro_f1"] = board["run"].map(lambda name: hidden[name]["test"])
    console.rule("pages")
    eda_page = eda(data, out / "eda.html")
    report_page = report(best.path)
    console.print(f"EDA of the data in {eda_page.seconds:.0f}s -> {eda_page.path}")
    console.print(
        f"report of {best.name} (curves, confusion, mistakes with Grad-CAM) in {report_page.seconds:.0f}s -> {report_page.path}"
    )
    seconds = time.time() - started
    files = {
        "eda": eda_page.path,
        "report": report_page.path,
        "data": data,
        "runs": out / "runs",
        "submission": out / "runs" / blended.name / "submission.csv",
        "submission_tta": prediction.path,
    }
    console.print(f"chance level: macro F1 ~{1 / 18:.3f}. Demo finished in {seconds:.0f}s.")
    console.print(
        f"files: data {data}\n       runs {out / 'runs'} (run.json, oof.csv, test.csv, submission.csv, fold_*/best.ckpt)"
        f"\n       ensemble submission {files['submission']}\n       TensorBoard: tensorboard --logdir {out / 'runs'}"
        f"\nnext: pstage board --runs {out / 'runs'} --html board.html"
    )
    return DemoResult(data, out / "runs", board, seconds, files)
