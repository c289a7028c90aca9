"""Recipe report: every recipe switch against the same seed and split with it off.

Trains one run per recipe on the same data, seed and person split (so the CVs are paired), and
prints a Markdown table: CV macro F1 (mean over folds, and per task: mask / gender / age), the
test macro F1 when the data carries its hidden answers (the demo's ``demo_truth.csv``: the only
honest score of pseudo-labels and final fit, which leave the CV unchanged or cannot show in it),
and wall time per recipe. ``baseline-again`` repeats the baseline: with every random draw seeded
(albumentations included) it must match it exactly, which is what makes the paired deltas mean
something; a difference there says the comparison is noise.

    python benchmarks/recipes.py                        # demo data (120 persons), ~10 min on 2 quiet cores
    python benchmarks/recipes.py --data DIR --epochs 12 --only baseline,borderline-drop
    python benchmarks/recipes.py --tiny                 # a seconds-scale smoke run of the script itself

The default setting is the test suite's LEARN one (tests/conftest.py): make_demo_data(persons=120,
image_size=(64, 48), seed=1), timm's test_resnet at 64x48, 3 folds x 12 epochs, lr 0.01.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd

BASE = [
    "model.name=test_resnet",
    "train.batch_size=32",
    "optim.lr=0.01",
    "train.progress=none",
    "log.loggers=[]",
]
# name -> (overrides, what it is compared with)
RECIPES: dict[str, tuple[list[str], str]] = {
    "baseline": ([], "-"),
    # the same run again: every draw is seeded, so it must equal the baseline (a reproducibility check)
    "baseline-again": ([], "baseline"),
    "multi": (["model.head=multi"], "baseline"),
    "age-regress": (["model.head=multi", "model.age_head=regress"], "multi"),
    "age-ordinal": (["model.head=multi", "model.age_head=ordinal"], "multi"),
    "borderline-drop": (["data.borderline.years=3"], "baseline"),
    "borderline-weight": (["data.borderline.years=3", "data.borderline.mode=weight"], "baseline"),
    "arcface": (["model.classifier=arcface"], "baseline"),
    "pseudo": (["pseudo.run=baseline", "pseudo.threshold=0.9"], "baseline"),
    "final-fit-blend": (["train.final_fit=blend"], "baseline"),
}


def test_f1(run: Path, data: Path) -> float | None:
    """Macro F1 of the run's submission against the demo's hidden answers (None without them)."""
    from pstage.core.metrics import macro_f1

    truth = data / "demo_truth.csv"
    if not truth.exists() or not (run / "submission.csv").exists():
        return None
    answers = pd.read_csv(truth, dtype={"ImageID": str}).set_index("ImageID")["ans"]
    sub = pd.read_csv(run / "submission.csv", dtype={"ImageID": str})
    return macro_f1(answers.loc[sub["ImageID"]].to_numpy(), sub["ans"].to_numpy())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="competition-layout data (default: generate demo data under --work)")
    parser.add_argument("--work", default="bench-recipes", help="folder for the demo data and the runs")
    parser.add_argument("--persons", type=int, default=120)
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--size", default="64x48", help="model input HxW")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--only", help="comma-separated recipes (baseline is added when a recipe needs it)")
    parser.add_argument("--tiny", action="store_true", help="smoke run: 30 persons, 32x24, 2 folds x 1 epoch")
    parser.add_argument("--out", help="also write the Markdown table to this file")
    args = parser.parse_args()

    from pstage.demo.synthetic import make_demo_data
    from pstage.training.train import train

    if args.tiny:
        args.persons, args.folds, args.epochs, args.size = 30, 2, 1, "32x24"
    work = Path(args.work)
    data = (
        Path(args.data)
        if args.data
        else make_demo_data(
            work / f"data-{args.persons}", persons=args.persons, eval_persons=12, image_size=(64, 48), seed=1
        )
    )
    height, width = (int(v) for v in args.size.lower().split("x"))
    base = [
        *BASE,
        f"seed={args.seed}",
        f"split.folds={args.folds}",
        f"train.epochs={args.epochs}",
        f"data.image_size=[{height},{width}]",
    ]
    names = list(RECIPES) if not args.only else [n.strip() for n in args.only.split(",")]
    unknown = [n for n in names if n not in RECIPES]
    if unknown:
        raise SystemExit(f"unknown recipe(s) {', '.join(unknown)}; choose from {', '.join(RECIPES)}")
    for name in list(names):  # a recipe's reference (and pseudo's teacher) trains first
        ref = RECIPES[name][1]
        if ref != "-" and ref not in names:
            names.insert(0, ref)
    names = sorted(dict.fromkeys(names), key=list(RECIPES).index)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    runs = work / f"runs-{stamp}"
    rows = []
    for name in names:
        shown, ref = RECIPES[name]
        overrides = [o.replace("pseudo.run=baseline", f"pseudo.run={runs / 'baseline'}") for o in shown]
        started = time.time()
        result = train(None, data=data, runs=runs, name=name, overrides=[*base, *overrides])
        seconds = time.time() - started
        cv = result.cv
        rows.append(
            {
                "recipe": name,
                "switch": " ".join(shown) or "(defaults)",
                "vs": ref,
                "cv": cv["macro_f1"],
                "std": cv["macro_f1_std"],
                **{k: cv["per_task"].get(k, np.nan) for k in ("mask", "gender", "age")},
                "test": test_f1(runs / name, data),
                "seconds": seconds,
            }
        )
        print(f"{name}: CV {cv['macro_f1']:.4f} in {seconds:.0f}s", flush=True)
    table = pd.DataFrame(rows).set_index("recipe")
    lines = [
        "| recipe | switch | CV macro F1 (± std) | Δ vs | mask | gender | age | test macro F1 | wall s |",
        "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, row in table.iterrows():
        delta = "" if row["vs"] == "-" else f"{row['cv'] - table.loc[row['vs'], 'cv']:+.4f} vs {row['vs']}"
        test = "" if row["test"] is None or pd.isna(row["test"]) else f"{row['test']:.4f}"
        lines.append(
            f"| {name} | `{row['switch']}` | {row['cv']:.4f} ± {row['std']:.4f} | {delta} | {row['mask']:.4f} | "
            f"{row['gender']:.4f} | {row['age']:.4f} | {test} | {row['seconds']:.0f} |"
        )
    setting = f"{data.name}: {args.folds} folds x {args.epochs} epochs, test_resnet {height}x{width}, seed {args.seed}"
    text = "\n".join([setting, "", *lines])
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
