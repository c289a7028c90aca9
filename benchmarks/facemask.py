"""Defaults on real faces: train named settings on a facemask build and score them on its eval truth.

The development set of real face photos with drawn masks (``../shared/data/facemask``: build it
under /tmp, never in the project) has eval answers the tool never sees, so each setting gets
an honest "private leaderboard" score next to its CV. Prints a Markdown table: CV macro F1, eval
macro F1, eval per task (mask / gender / age macro F1), gender accuracy, and wall time of the
whole ``pstage train`` command (cache included: clear ``--cache`` between settings to count it).

    python ../shared/data/facemask/build.py /tmp/facemask                       # 2,000 + 600 persons
    python benchmarks/facemask.py --data /tmp/facemask --persons 1500 --only default-15m --cold
    python benchmarks/facemask.py --data /tmp/facemask --list                 # the settings

``--persons N`` trains on the first N persons of train.csv (a linked copy of the folder, so the
held-out set's 1,500-person size can be mimicked); eval stays whole.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import f1_score

_96 = ["data.image_size=[96,96]", "train.min_epochs=6", "tta.train=false"]  # a 96x96 model, 6-epoch floor
_BASIC = ["augment.preset=basic", "loss.label_smoothing=0"]
_FOLD0 = ["train.folds=[0]"]
_R10T = ["model.name=resnet10t", "model.pretrained=false", "data.image_size=[64,48]"]  # small, from scratch

# name -> overrides on top of the defaults (each a `pstage train` KEY=VALUE); benchmarks/RESULTS.md
# names the setting behind each of its facemask rows, with the --persons it ran on
SETTINGS: dict[str, list[str]] = {
    "default-15m": ["train.time=15m"],
    "default-4m": ["train.time=4m"],
    # gpu_check.sh facemask: the build and 6m (+10%) fit one 600 s device call
    "default-6m": ["train.time=6m"],
    "defaults": [],
    # under a budget (--persons 1500 for 15m, 300 for 4m)
    "15m-no-tta": ["train.time=15m", "tta.train=false"],
    "15m-batched": ["train.time=15m", "augment.device=true"],
    "15m-96": ["train.time=15m", *_96],
    "15m-96-min2": ["train.time=15m", *_96, "train.min_epochs=2"],
    "15m-96-basic": ["train.time=15m", *_96, *_BASIC],
    "15m-96-basic-min1": ["train.time=15m", *_96, *_BASIC, "train.min_epochs=1"],
    "4m-96": ["train.time=4m", *_96],
    "4m-96-basic": ["train.time=4m", *_96, *_BASIC],
    # fold 0 at equal epochs (--persons 600)
    "f0-8ep": [*_FOLD0, "train.epochs=8"],
    "f0-8ep-224": [*_FOLD0, "train.epochs=8", "data.image_size=[224,224]"],
    "f0-8ep-margin0.3": [*_FOLD0, "train.epochs=8", "data.face_margin=0.3"],
    "f0-8ep-margin1.0": [*_FOLD0, "train.epochs=8", "data.face_margin=1.0"],
    "f0-8ep-multi": [*_FOLD0, "train.epochs=8", "model.head=multi"],
    "f0-8ep-cutmix": [*_FOLD0, "train.epochs=8", "augment.cutmix.p=0.5"],
    "f0-15ep": [*_FOLD0, "train.epochs=15"],
    # the face crop, on a small model from scratch (--persons 600)
    "f0-crop-none": [*_FOLD0, "train.epochs=3", *_R10T, "data.face_crop=false"],
    "f0-crop-haar": [*_FOLD0, "train.epochs=3", *_R10T, "data.face_crop=true", "data.face_detector=haar"],
    "f0-crop-retinaface": [*_FOLD0, "train.epochs=3", *_R10T, "data.face_crop=true", "data.face_detector=retinaface"],
    # pretrained vs from scratch (--persons 250)
    "f0-lite0-96": [*_FOLD0, "train.epochs=4", "data.image_size=[96,96]"],
    "f0-r10t-scratch": [*_FOLD0, "train.epochs=4", *_R10T],
    # person grouping on a small, weak run (a build with --train 300 --eval 100)
    "small-2x3": ["split.folds=2", "train.epochs=3"],
    "small-2x3-ungrouped": ["split.folds=2", "train.epochs=3", "persons.group=off"],
}


def subset(data: Path, persons: int, out: Path) -> Path:
    """A competition folder with the first ``persons`` persons of train (symlinks, eval shared)."""
    if (out / "train" / "train.csv").exists():
        return out
    (out / "train" / "images").mkdir(parents=True, exist_ok=True)
    table = pd.read_csv(data / "train" / "train.csv", dtype=str).head(persons)
    for folder in table["path"]:
        link = out / "train" / "images" / folder
        if not link.exists():
            link.symlink_to((data / "train" / "images" / folder).resolve())
    table.to_csv(out / "train" / "train.csv", index=False)
    if not (out / "eval").exists():
        (out / "eval").symlink_to((data / "eval").resolve())
    return out


def eval_scores(submission: Path, truth: Path) -> dict[str, float]:
    """Macro F1 over the 18 classes and per task (mask = y // 6, gender = y // 3 % 2, age = y % 3)."""
    sub = pd.read_csv(submission, dtype={"ImageID": str}).set_index("ImageID")["ans"]
    ans = pd.read_csv(truth, dtype={"ImageID": str}).set_index("ImageID")["ans"]
    y, p = ans.to_numpy(), sub.loc[ans.index].to_numpy()
    scores = {"eval": f1_score(y, p, average="macro")}
    for task, part in (("mask", lambda v: v // 6), ("gender", lambda v: v // 3 % 2), ("age", lambda v: v % 3)):
        scores[task] = f1_score(part(y), part(p), average="macro")
    scores["gender_acc"] = float(np.mean(y // 3 % 2 == p // 3 % 2))
    return scores


def run_setting(
    name: str, overrides: list[str], data: Path, runs: Path, truth: Path, extra: list[str], cold: bool = False
) -> dict:
    """Train one setting with the CLI (the command a user types) and score it; ``cold``: in a fresh
    image cache of its own, so the decoding and face detection count in its time as on a new machine."""
    shutil.rmtree(runs / name, ignore_errors=True)
    if cold:
        shutil.rmtree(runs / f"{name}.cache", ignore_errors=True)
        extra = [*extra, f"data.cache_dir={runs / f'{name}.cache'}"]
    cmd = [
        sys.executable,
        "-m",
        "pstage",
        "train",
        "--data",
        str(data),
        "--runs",
        str(runs),
        "--name",
        name,
        "train.progress=epoch",
        *overrides,
        *extra,
    ]
    print("$", " ".join(cmd[2:]), flush=True)
    started = time.time()
    done = subprocess.run(cmd)
    seconds = time.time() - started
    row = {"setting": name, "overrides": " ".join(overrides + extra) or "(defaults)", "seconds": round(seconds)}
    info_file = runs / name / "run.json"
    if done.returncode != 0 or not info_file.exists():
        return {**row, "status": f"exit {done.returncode}"}
    info = json.loads(info_file.read_text())
    cv = info.get("cv") or {}
    row.update(status=info.get("status"), cv=cv.get("macro_f1"))
    row.update({f"cv_{k}": v for k, v in (cv.get("per_task") or {}).items()})
    if (runs / name / "submission.csv").exists():
        row.update(eval_scores(runs / name / "submission.csv", truth))
    return row


def table(rows: list[dict]) -> str:
    cols = ["setting", "cv", "eval", "mask", "gender", "age", "gender_acc", "seconds", "overrides"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = [f"{r[c]:.3f}" if isinstance(r.get(c), float) else str(r.get(c, "-")) for c in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help="a facemask build (train/, eval/, eval_labels.csv)")
    ap.add_argument("--persons", type=int, default=0, help="train on the first N persons (0: all)")
    ap.add_argument("--runs", type=Path, default=Path("/tmp/facemask-runs"))
    ap.add_argument("--only", default="", help="comma-separated setting names")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        help="NAME=KEY=VALUE,KEY=VALUE: an extra setting (lists in [..] may hold commas)",
    )
    ap.add_argument("--extra", nargs="*", default=[], help="KEY=VALUE added to every setting")
    ap.add_argument("--cold", action="store_true", help="each setting builds its own image cache (timed)")
    ap.add_argument("--list", action="store_true")
    args = ap.parse_args()
    settings = dict(SETTINGS)
    for spec in args.set:
        name, _, values = spec.partition("=")
        settings[name] = [v for v in re.split(r",(?![^\[]*\])", values) if v]  # commas inside [..] stay
    if args.list:
        for name, overrides in settings.items():
            print(f"{name:16s} {' '.join(overrides) or '(defaults)'}")
        return
    truth = args.data / "eval_labels.csv"
    data = subset(args.data, args.persons, args.runs / f"data-{args.persons}") if args.persons else args.data
    names = [n for n in args.only.split(",") if n] or list(settings)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    rows = []
    for name in names:
        rows.append(run_setting(name, settings[name], data, args.runs, truth, args.extra, args.cold))
        print(table(rows), flush=True)
    (args.runs / "facemask-table.md").write_text(table(rows) + "\n")


if __name__ == "__main__":
    main()
