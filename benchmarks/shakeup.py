"""Shake-up on facemask: does the best CV pick the best private score, and are pstage's odds right?

Given finished run folders (training runs and ensembles) trained on a facemask build, and its
eval truth (the "private leaderboard" the tool never sees), prints a Markdown table: each run's
folds, CV with its bootstrap interval over persons, eval macro F1 with its interval over eval
persons, pstage's predicted P(beats the best-CV run) on a leaderboard of the eval set's size,
and how often it really beats it over bootstrap draws of eval persons. Then: is the best-CV run
the best on eval (over the runs given, and over the eval draws), how often the higher CV of two
runs has the higher eval score, whether each run's eval score lies inside its CV interval, and
each ensemble against its best member on eval.

    python ../shared/data/facemask/build.py /tmp/facemask
    python benchmarks/shakeup.py --truth /tmp/facemask/eval_labels.csv --runs /tmp/facemask-runs
    python benchmarks/shakeup.py --truth T.csv --run runs/a --run runs/b --run runs/ens

Eval photos are shuffled (not grouped by person); build.py names each one sha1("<face path>/<stem>"),
so hashing the face files again (``--faces``: the folder build.py read) recovers every photo's
person. If none matches, one eval image is one unit, and the output says so.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import os
from pathlib import Path

import numpy as np
import pandas as pd

from pstage.core.shakeup import DRAWS, draw_counts, macro_f1_of_counts, unit_counts
from pstage.runs.rundir import RunDir
from pstage.runs.shakeup import beats, run_interval

# the face folder beside build.py, in the first folder above this checkout that has shared/
FACES = next(
    (p / "shared" / "data" / "facemask" / "faces" for p in Path(__file__).resolve().parents if (p / "shared").is_dir()),
    Path("shared/data/facemask/faces"),
)
STEMS = [f"mask{i}" for i in range(1, 6)] + ["incorrect_mask", "normal"]
NUM_CLASSES = 18


def eval_persons(image_ids: pd.Series, faces: Path) -> tuple[np.ndarray, str]:
    """Each eval photo's person, from build.py's file names (sha1 of '<face path>/<stem>'); else the photo."""
    owner: dict[str, str] = {}
    if faces.is_dir():
        for root, _, names in os.walk(str(faces)):
            for name in names:
                path = os.path.join(root, name)
                for stem in STEMS:
                    owner[hashlib.sha1(f"{path}/{stem}".encode()).hexdigest() + ".jpg"] = path
    found = image_ids.map(owner)
    if found.notna().all():
        return found.to_numpy(), "persons"
    return (
        image_ids.to_numpy(),
        f"images (only {int(found.notna().sum())} of {len(found)} eval photos matched a face in {faces})",
    )


def find_runs(folders: list[Path], runs: list[Path]) -> list[RunDir]:
    """Finished runs with a submission: the ``--run`` folders, and every run folder directly under ``--runs``."""
    found = [RunDir(p) for p in runs]
    for folder in folders:
        found += [RunDir(p) for p in sorted(folder.iterdir()) if (p / "run.json").is_file()]
    return [r for r in found if r.info.done and r.output("submission").is_file() and r.info.score is not None]


def eval_predictions(run: RunDir, ids: pd.Series) -> np.ndarray:
    sub = pd.read_csv(run.output("submission"), dtype={"ImageID": str}).set_index("ImageID")["ans"]
    missing = ids[~ids.isin(sub.index)]
    if len(missing):
        raise SystemExit(f"{run.path}/submission.csv lacks {len(missing)} eval images, e.g. {missing.iloc[0]}")
    return sub.loc[ids].to_numpy(dtype=np.int64)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--truth", type=Path, required=True, help="eval_labels.csv (ImageID,ans) of a facemask build")
    ap.add_argument("--runs", type=Path, action="append", default=[], help="a folder of run folders (repeatable)")
    ap.add_argument("--run", type=Path, action="append", default=[], help="one run folder (repeatable)")
    ap.add_argument("--faces", type=Path, default=FACES, help="the face folder build.py read (person ids)")
    ap.add_argument("--lb-persons", type=int, default=0, help="leaderboard size (default: the eval persons)")
    ap.add_argument("--draws", type=int, default=DRAWS)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, help="also write the Markdown here")
    args = ap.parse_args()
    runs = find_runs(args.runs, args.run)
    if len(runs) < 2:
        raise SystemExit("give at least two finished runs with a submission.csv (--runs FOLDER or --run RUN)")
    truth = pd.read_csv(args.truth, dtype={"ImageID": str})
    ids, y = truth["ImageID"], truth["ans"].to_numpy(dtype=np.int64)
    persons, unit = eval_persons(ids, args.faces)
    codes, persons_n = np.unique(persons, return_inverse=True)[1], len(np.unique(persons))
    size = args.lb_persons or persons_n
    names = [r.info.name or r.path.name for r in runs]
    cv = np.array([float(r.info.score) for r in runs])
    counts = [unit_counts(y, eval_predictions(r, ids), codes, persons_n, NUM_CLASSES) for r in runs]
    eval_f1 = np.array([macro_f1_of_counts(c.sum(0), NUM_CLASSES) for c in counts])
    best = int(np.argmax(cv))
    # eval draws: `size` eval persons with replacement, every run scored on the same draw
    rng = np.random.default_rng(args.seed)
    draws = np.concatenate(
        [
            np.stack([macro_f1_of_counts(w @ c, NUM_CLASSES) for c in counts], 1)
            for w in draw_counts(rng, persons_n, args.draws, size)
        ]
    )
    low, high = np.percentile(draws, [2.5, 97.5], axis=0)
    realised = (draws > draws[:, [best]]).mean(0) + 0.5 * (draws == draws[:, [best]]).mean(0)
    rows = []
    for i, run in enumerate(runs):
        interval = run_interval(run, draws=args.draws, seed=args.seed)
        predicted = None if i == best else beats(run, runs[best], size, draws=args.draws, seed=args.seed)
        rows.append(
            {
                "run": names[i],
                "kind": run.info.kind,
                "folds": ",".join(map(str, run.info.folds_trained or [f.fold for f in run.info.cv.folds])),
                "cv": cv[i],
                "cv_interval": "-" if interval is None else f"{interval.low:.3f}-{interval.high:.3f}",
                "cv_covers_eval": None if interval is None else bool(interval.low <= eval_f1[i] <= interval.high),
                "eval": eval_f1[i],
                "eval_interval": f"{low[i]:.3f}-{high[i]:.3f}",
                "p_predicted": "best CV" if i == best else ("-" if predicted is None else f"{predicted:.2f}"),
                "p_realised": "best CV" if i == best else f"{realised[i]:.2f}",
            }
        )
    lines = [
        f"{len(runs)} runs; eval: {len(ids):,} images, {persons_n:,} {unit}; leaderboard draws of {size:,} "
        f"{'persons' if unit == 'persons' else 'units'}, {args.draws:,} draws",
        "",
        "| run | kind | folds | CV | CV 95% interval | eval macro F1 | eval 95% interval | P(beats best CV) predicted | realised on eval draws |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: -r["cv"]):
        lines.append(
            f"| {r['run']} | {r['kind']} | {r['folds']} | {r['cv']:.4f} | {r['cv_interval']} | {r['eval']:.4f} | "
            f"{r['eval_interval']} | {r['p_predicted']} | {r['p_realised']} |"
        )
    winners = np.bincount(draws.argmax(1), minlength=len(runs)) / len(draws)
    pairs = [(i, j) for i, j in itertools.combinations(range(len(runs)), 2) if cv[i] != cv[j]]
    agree = sum((cv[i] > cv[j]) == (eval_f1[i] > eval_f1[j]) for i, j in pairs)
    covered = [r["cv_covers_eval"] for r in rows if r["cv_covers_eval"] is not None]
    lines += [
        "",
        f"- best CV: {names[best]} ({cv[best]:.4f}); best eval: {names[int(np.argmax(eval_f1))]} "
        f"({eval_f1.max():.4f}): the best-CV run {'IS' if int(np.argmax(eval_f1)) == best else 'is NOT'} the best on eval",
        f"- over {len(draws):,} draws of {size:,} eval {unit.split()[0]}, the best-CV run is the best on eval in "
        f"{winners[best]:.0%} of them (most often best: {names[int(np.argmax(winners))]}, {winners.max():.0%})",
        f"- of {len(pairs)} pairs of runs, the higher CV has the higher eval score in {agree} ({agree / max(len(pairs), 1):.0%})",
        f"- eval macro F1 inside the run's CV interval: {sum(covered)} of {len(covered)} runs",
    ]
    for i, run in enumerate(runs):
        members = [m.run for m in run.info.members]
        inside = [j for j, n in enumerate(names) if n in members or runs[j].path.name in members]
        if run.info.kind == "ensemble" and inside:
            top = max(inside, key=lambda j: eval_f1[j])
            lines.append(
                f"- ensemble {names[i]} (folds {rows[i]['folds']}): eval {eval_f1[i]:.4f} vs its best member on eval "
                f"{names[top]} {eval_f1[top]:.4f} ({eval_f1[i] - eval_f1[top]:+.4f}); P(it beats that member) over "
                f"the eval draws {np.mean(draws[:, i] > draws[:, top]):.0%}"
            )
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
