"""Label-issue audit: rank likely mislabelled images from OOF probabilities, person by person.

cleanlab's confident learning finds the images whose given label the out-of-fold model
contradicts most. Persons matter here: gender and age are labelled once per person, so several
suspect photos of one person whose head probabilities agree on another gender or age suggest a
wrong person-level label. The audit writes CSVs the user edits; ``relabel`` turns the edited file
into a label override file that training reads (``data.relabel``), never touching the data.
"""

from __future__ import annotations

import html
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from cleanlab.filter import find_label_issues
from cleanlab.rank import get_label_quality_scores

from pstage.core.io import write_csv
from pstage.core.metrics import prob_columns
from pstage.core.tasks import Task
from pstage.data.relabel import check_relabel, read_relabel
from pstage.data.sources import load_source
from pstage.report.pages import table, tiles
from pstage.report.pictures import training_images
from pstage.runs.rundir import Run

GRID = 24


@dataclass
class AuditResult:
    """Suspect images (ranked), persons with a suggested relabel, and the files written."""

    suspects: pd.DataFrame
    persons: pd.DataFrame
    folder: Path
    html: str


def rank_label_issues(targets: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(indices of likely label issues, most likely first; label quality per image in [0, 1])."""
    probs = probs / probs.sum(1, keepdims=True)
    quality = get_label_quality_scores(targets, probs, method="self_confidence")
    present = np.unique(targets)
    if len(present) < 2:
        return np.zeros(0, dtype=int), quality
    # cleanlab needs every column to be a class with examples: audit over the classes present.
    column = {c: i for i, c in enumerate(present)}
    sub = probs[:, present] / np.clip(probs[:, present].sum(1, keepdims=True), 1e-12, None)
    with warnings.catch_warnings():  # "may not flag all issues in class k (few examples)": expected on small data
        warnings.simplefilter("ignore", UserWarning)
        issues = find_label_issues(
            np.array([column[t] for t in targets]),
            sub,
            return_indices_ranked_by="self_confidence",
            min_examples_per_class=1,
        )
    return np.asarray(issues, dtype=int), quality


def _head_probs(probs: np.ndarray, task: Task, head: str) -> np.ndarray:
    index = np.asarray(task.class_to_head[head])
    return np.stack([probs[:, index == h].sum(1) for h in range(len(task.heads[head]))], axis=1)


def audit(run: Run, task: Task, oof: pd.DataFrame, pictures: tuple[Any, pd.Series] | str | None = None) -> AuditResult:
    """Rank suspects, aggregate per person, write ``<run>/audit/{suspects,persons,corrections}.csv``.

    On the mask task the image-level audit runs on the mask head (the only label given per photo)
    and the person-level one on gender and age with each person's photos pooled; other tasks get
    one image-level audit over their classes.
    """
    probs = oof[prob_columns(task.num_classes)].to_numpy()
    probs = probs / probs.sum(1, keepdims=True)
    targets = oof["target"].to_numpy()
    folds = run.table("folds")
    groups = (
        oof["image_id"].map(folds.set_index("image_id")["group"]) if folds is not None else oof["image_id"]
    ).astype(str)
    mask_task = task.has_subtasks and {"mask", "gender", "age"} <= set(task.heads)
    head = "mask" if mask_task else next(iter(task.heads))
    head_probs = _head_probs(probs, task, head) if mask_task else probs
    head_targets = np.asarray(task.class_to_head[head])[targets] if mask_task else targets
    issues, quality = rank_label_issues(head_targets, head_probs)
    names = task.heads[head] if mask_task else task.classes
    predicted = head_probs.argmax(1)
    suspects = pd.DataFrame(
        {
            "rank": np.arange(1, len(issues) + 1),
            "image_id": oof["image_id"].to_numpy()[issues],
            "person": groups.to_numpy()[issues],
            "given": [task.classes[t] for t in targets[issues]],
            "predicted": [task.classes[p] for p in probs.argmax(1)[issues]],
            "label_quality": quality[issues].round(4),
            "suggestion": [f"{head} {names[head_targets[i]]} -> {names[predicted[i]]}" for i in issues],
        }
    )
    persons = _persons(task, probs, targets, groups) if mask_task else pd.DataFrame(columns=["person", "suggestion"])
    folder = run.path / "audit"
    folder.mkdir(exist_ok=True)
    write_csv(folder / "suspects.csv", suspects)
    write_csv(folder / "persons.csv", persons)
    write_csv(folder / "corrections.csv", _corrections(task, suspects, persons, mask_task))
    if pictures is None:
        try:
            pictures = training_images(run)
        except Exception as exc:  # the audit tables stand without pictures (e.g. data moved away)
            pictures = str(exc)
    return AuditResult(suspects, persons, folder, _html(run, suspects, persons, folder, len(oof), pictures))


def _persons(task: Task, probs: np.ndarray, targets: np.ndarray, groups: pd.Series) -> pd.DataFrame:
    """Person-level audit of gender and age: each person's photos pooled, then confident learning over persons."""
    order = pd.Index(groups.unique())
    codes = order.get_indexer(groups)
    frame = pd.DataFrame({"person": order, "images": np.bincount(codes)})
    suspicion = np.zeros(len(order))
    notes = [[] for _ in order]
    for head in ("gender", "age"):
        pooled = np.zeros((len(order), len(task.heads[head])))
        np.add.at(pooled, codes, _head_probs(probs, task, head))
        pooled /= pooled.sum(1, keepdims=True)
        given = np.zeros(len(order), dtype=int)
        given[codes] = np.asarray(task.class_to_head[head])[targets]  # one label per person
        issues, quality = rank_label_issues(given, pooled)
        model = pooled.argmax(1)
        frame[f"given_{head}"] = [task.heads[head][g] for g in given]
        frame[f"model_{head}"] = [task.heads[head][m] for m in model]
        frame[f"p_model_{head}"] = pooled.max(1).round(3)
        frame[f"quality_{head}"] = quality.round(4)
        for i in issues:
            notes[i].append(f"{head} {task.heads[head][given[i]]} -> {task.heads[head][model[i]]}")
            suspicion[i] = max(suspicion[i], 1 - quality[i])
    frame["suggestion"] = ["; ".join(n) for n in notes]
    frame["suspicion"] = suspicion.round(4)
    return frame.sort_values("suspicion", ascending=False, kind="stable").reset_index(drop=True)


def _corrections(task: Task, suspects: pd.DataFrame, persons: pd.DataFrame, mask_task: bool) -> pd.DataFrame:
    """A template to edit: the suggested relabels, one per row (delete what you disagree with)."""
    rows = []
    for row in persons[persons["suggestion"] != ""].itertuples():
        fix = {
            "person": row.person,
            "image_id": "",
            "gender": "",
            "age": "",
            "mask": "",
            "label": "",
            "note": row.suggestion,
        }
        if row.model_gender != row.given_gender:
            fix["gender"] = row.model_gender
        if row.model_age != row.given_age:
            fix["note"] += " (set age to a number in that bucket)"
        rows.append(fix)
    for row in suspects.itertuples():
        new = row.suggestion.split(" -> ")[1]
        fix = {
            "person": "",
            "image_id": row.image_id,
            "gender": "",
            "age": "",
            "mask": "",
            "label": "",
            "note": row.suggestion,
        }
        fix["mask" if mask_task else "label"] = new
        rows.append(fix)
    return pd.DataFrame(rows, columns=["person", "image_id", "gender", "age", "mask", "label", "note"])


def _html(
    run: Run,
    suspects: pd.DataFrame,
    persons: pd.DataFrame,
    folder: Path,
    total: int,
    pictures: tuple[Any, pd.Series] | str,
) -> str:
    flagged = persons[persons["suggestion"] != ""]
    intro = (
        f"<p>cleanlab's confident learning on the out-of-fold probabilities flags <b>{len(suspects)}</b> of {total:,} "
        f"images{f' and <b>{len(flagged)}</b> persons' if len(persons) else ''} as likely mislabelled. Files: "
        f"{html.escape(str(folder))}/suspects.csv, persons.csv and corrections.csv — keep the corrections you agree "
        f"with, then <code>pstage report {html.escape(run.name)} --relabel corrections.csv</code> writes a label "
        "override file for <code>data.relabel</code>.</p>"
    )
    person_table = ""
    if len(flagged):
        person_table = (
            "<p>Persons whose photos, pooled, point to another gender or age (labels given once per person):</p>"
            + table(
                ["person", "photos", "suggestion", "p(model gender)", "p(model age)"],
                [
                    [r.person, r.images, r.suggestion, r.p_model_gender, r.p_model_age]
                    for r in flagged.head(20).itertuples()
                ],
                left=1,
            )
        )
    if isinstance(pictures, str):
        grid = f"<p class='warn'>no pictures: {html.escape(pictures)}</p>"
    else:
        images, rows = pictures
        grid = tiles(
            [
                (images[rows[r.image_id]], f"#{r.rank} {r.image_id}\n{r.suggestion}\ngiven: {r.given}")
                for r in suspects.head(GRID).itertuples()
            ]
        )
    return intro + person_table + "<p>Top suspect photos:</p>" + grid


def relabel(run: Run, corrections: str | Path, task: Task) -> tuple[Path, int]:
    """Check a corrections CSV against the run's data and write ``<run>/audit/relabel.csv`` for data.relabel."""
    path = Path(corrections)
    frame = read_relabel(path)
    config = run.load_config()
    source = load_source(config.data.model_copy(update={"relabel": None}))
    check_relabel(frame, source.train, path, source.kind)
    target = run.path / "audit" / "relabel.csv"
    target.parent.mkdir(exist_ok=True)
    write_csv(target, frame)
    return target, len(frame)
