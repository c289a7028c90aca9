"""What pooling a person's gender and age is worth on a finished mask-task run's OOF, by method.

Reads a run's oof.csv (each fold's validation photos, predicted by that fold's model) and its
data's persons, and prints a Markdown table: grouping purity (ARI, share of photos grouped
exactly with their person), OOF CV macro F1 and per task, and the gain over the ungrouped OOF for

- ``none``: the run's own OOF;
- ``each photo alone``: the pooling's factorisation without any grouping (a weak model's argmax
  over the 18 classes moves by it alone);
- ``true persons``: pooling over the real persons (the upper bound of any grouping);
- ``fold``/``dlib_resnet`` hard: the product's grouping (``pstage.inference.persons``), cut chosen
  on this OOF by the grouped CV (``fold`` needs the run's fold models: ``--fold``);
- ``dlib_resnet`` soft: every photo pools the other photos of its fold weighted by similarity,
  ``exp(-(d / scale)^2)`` on the centred cosine distance ``d`` (cannot-links weigh 0), scale chosen on OOF;
- ``dlib_resnet`` hard + state weights: a group's unmasked (and incorrectly masked) photos weigh
  more, as they show more of the face; weights chosen on OOF.

Choices made on the same OOF they are scored on flatter every row alike (the product chooses its
cut the same way).

    pstage train --data /tmp/facemask train.time=15m --name fm15      # a 15-minute facemask run
    python benchmarks/pooling.py --run runs/fm15 [--fold]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.spatial.distance import cdist

from pstage.config import load_run_config
from pstage.core.metrics import cv_scores, fold_macro_f1, prob_columns
from pstage.data.prepare import prepare_caches
from pstage.data.sources import load_source
from pstage.inference import persons as P
from pstage.inference.predict import fold_checkpoints
from pstage.runs.rundir import RunDir, fold_id


def joint_logs(probs: np.ndarray, task) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per photo: log of the joint gender x age distribution, the class -> joint index, the mask marginals."""
    ga = np.asarray(task.class_to_head["gender"]) * len(task.heads["age"]) + np.asarray(task.class_to_head["age"])
    joint = np.stack([probs[:, ga == k].sum(1) for k in range(ga.max() + 1)], axis=1)
    return np.log(np.clip(joint, 1e-8, None)), ga, P.head_probs(probs, task, "mask")


def weighted_pool(probs: np.ndarray, weights: np.ndarray, task) -> np.ndarray:
    """Final-class probabilities: own mask marginal x the weighted mean log joint of the photos (rows of ``weights``)."""
    logs, ga, masks = joint_logs(probs, task)
    mean = (weights @ logs) / weights.sum(1, keepdims=True)
    shared = np.exp(mean - mean.max(1, keepdims=True))
    shared /= shared.sum(1, keepdims=True)
    return masks[:, np.asarray(task.class_to_head["mask"])] * shared[:, ga]


def per_fold(oof: pd.DataFrame, classes: int, fn) -> np.ndarray:
    """``fn(rows)`` -> pooled probabilities for each fold's rows, assembled in oof order."""
    out = np.zeros((len(oof), classes))
    for fold in np.unique(oof["fold"]):
        rows = (oof["fold"] == fold).to_numpy()
        out[rows] = fn(rows)
    return out


def markdown(frame: pd.DataFrame, digits: int) -> str:
    """A Markdown table (pandas' to_markdown needs the tabulate package)."""
    cell = lambda v: f"{v:.{digits}f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(frame.columns) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--fold", action="store_true", help="also the fold models' features (predicts the OOF again)")
    args = parser.parse_args()
    config = load_run_config(args.run / "config.yaml")
    task = RunDir(args.run).read_info().as_task()
    source = load_source(config.data)
    train_cache = None
    if args.fold:  # the fold models read the decoded cache
        source, train_cache, _ = prepare_caches(source, config, verbose=False)
    oof = pd.read_csv(args.run / "oof.csv", dtype={"image_id": str})
    cols = prob_columns(task.num_classes)
    probs = oof[cols].to_numpy()
    folds, targets = oof["fold"].to_numpy(), oof["target"].to_numpy()
    table = source.train.set_index("image_id")
    people = table.loc[oof["image_id"], "group"].astype(str).to_numpy()
    states = P.mask_states(probs, task)
    rows_out: list[dict] = []

    def add(name: str, pooled: np.ndarray, groups: np.ndarray | None, choice: str = "") -> None:
        cv = cv_scores(oof.assign(**dict(zip(cols, pooled.T, strict=True))), task)
        purity = P.purity(groups, people) if groups is not None else {"ari": np.nan, "exact": np.nan}
        rows_out.append(
            {
                "method": name,
                "chosen on OOF": choice,
                "ARI": purity["ari"],
                "exact": purity["exact"],
                "CV macro F1": cv["macro_f1"],
                **{h: cv["per_task"][h] for h in ("mask", "gender", "age")},
            }
        )

    add("none", probs, None)
    # each photo its own group: only the factorisation (own mask marginal x own gender x age joint),
    # which moves a weak model's argmax by itself; the grouping's own worth is the gain over this row
    alone = np.arange(len(oof))
    add("each photo alone", P.pool(probs, alone, task), alone)
    truth = pd.factorize(pd.Series(people) + "/" + pd.Series(folds).astype(str))[0]
    add("true persons", P.pool(probs, truth, task), truth)

    embeddings = {}
    if args.fold:
        by_fold = {fold_id(c): c for c in fold_checkpoints(args.run)}
        embeddings["fold"] = P._fold_oof_embeddings(oof, table, by_fold, train_cache.path, config)
    positions = pd.Series(np.arange(len(source.train)), index=source.train["image_id"])
    face, _, _ = P.face_features(
        source.train["path"].tolist(), positions.loc[oof["image_id"]].to_numpy(), config, "dlib_resnet"
    )
    embeddings["dlib_resnet"] = face
    for name, x in embeddings.items():
        cuts = P.THRESHOLDS if name == "fold" else P.FACE_THRESHOLDS
        choice = P.choose_threshold(oof, x, people, task, None, cuts)
        add(f"{name} hard", choice.probs, choice.groups, f"cut {choice.threshold:g}")

    # soft pooling on the face embedding: similarity weights within each fold, cannot-links 0
    def soft(scale: float) -> np.ndarray:
        def fn(rows: np.ndarray) -> np.ndarray:
            d = cdist(face[rows], face[rows], "cosine")
            s = states[rows]
            w = np.exp(-((d / scale) ** 2)) * ~((s[:, None] == s[None, :]) & (s[:, None] > 0))
            np.fill_diagonal(w, 1.0)
            return weighted_pool(probs[rows], w, task)

        return per_fold(oof, task.num_classes, fn)

    scales = [0.1, 0.15, 0.2, 0.3, 0.4]
    best = max(scales, key=lambda s: fold_macro_f1(targets, soft(s), folds))
    add("dlib_resnet soft", soft(best), None, f"scale {best:g}")

    # hard groups (the product's cut) with a group's unmasked / incorrect photos weighing more
    choice = P.choose_threshold(oof, face, people, task, None, P.FACE_THRESHOLDS)
    groups = choice.groups

    def weighted(w_normal: float, w_incorrect: float) -> np.ndarray:
        photo = np.select([states == 2, states == 1], [w_normal, w_incorrect], 1.0)
        same = groups[:, None] == groups[None, :]
        return weighted_pool(probs, same * photo[None, :], task)

    grid = [(n, i) for n in (1.0, 2.0, 4.0) for i in (1.0, 2.0)]
    w_best = max(grid, key=lambda g: fold_macro_f1(targets, weighted(*g), folds))
    add(
        "dlib_resnet hard + state weights",
        weighted(*w_best),
        groups,
        f"normal x{w_best[0]:g}, incorrect x{w_best[1]:g}",
    )

    frame = pd.DataFrame(rows_out)
    frame.insert(5, "gain", frame["CV macro F1"] - frame.loc[0, "CV macro F1"])
    print(f"{args.run}: {len(oof)} OOF photos, {len(np.unique(people))} persons, folds {sorted(np.unique(folds))}\n")
    print(markdown(frame, 4))


if __name__ == "__main__":
    main()
