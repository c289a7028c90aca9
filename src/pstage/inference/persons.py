"""Person-consistent predictions (mask task): group test photos by identity, pool gender and age.

A person's 7 photos (5 mask, 1 incorrect, 1 normal) share one gender and one age, but test photos
arrive unlabelled and shuffled. So: embed every image (``persons.embedding``: a face-recognition
network that sees the eyes and nose only, ``pstage.data.identity``, centred on the training photos'
mean; or the trained fold models' pooled backbone features, L2-normalised, several folds
concatenated so a distance is the mean of the folds' cosine distances), cluster them (average-linkage agglomerative clustering on cosine
distance, cut at a distance threshold; two photos both predicted ``normal`` or both
``incorrect`` may not share a group, since a person has one of each), then within a group average
the log-probabilities of the joint gender x age distribution; each photo keeps its own mask
probabilities. The threshold is chosen on the run's OOF predictions, where persons are known
(each fold's validation images; with fold features, embedded by that fold's own model), by the
grouped CV macro F1.

On facemask (real faces, drawn masks; groups of 300 persons) the face network groups photos at
ARI 0.99 where the fold models' features reach 0.14 (benchmarks/identity.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import pdist
from sklearn.metrics import adjusted_rand_score

from pstage.config import Config, batch_of
from pstage.core.console import console
from pstage.core.devices import inference_device, resolve_precision
from pstage.core.errors import ConfigError
from pstage.core.io import write_csv
from pstage.core.metrics import cv_scores, fold_macro_f1, prob_columns
from pstage.core.tasks import Task
from pstage.data.datasets import inference_batches
from pstage.data.faces import DEFAULT_DETECTOR, FALLBACK_DETECTOR, unavailable
from pstage.data.identity import FACE_MODELS_INSTALL, face_embeddings, face_model_missing
from pstage.models.checkpoint import load_fold_module
from pstage.models.module import ClassifierModule
from pstage.runs.info import RunInfo
from pstage.runs.rundir import fold_id, submission_frame

# Candidate cosine-distance cuts searched on OOF (average linkage: the mean distance between two groups).
THRESHOLDS = tuple(round(t, 3) for t in np.arange(0.02, 0.62, 0.02))
# Face embeddings, centred, spread further apart: their best cuts on facemask lie at 0.4-0.5.
FACE_THRESHOLDS = tuple(round(t, 3) for t in np.arange(0.1, 0.9, 0.02))
FORBIDDEN = 1e3  # distance of a cannot-link pair: larger than any average it can take part in matters
FACE_MODEL = "dlib_resnet"


def supports(task: Task) -> bool:
    """Grouping needs the mask task's heads: a mask state per photo and gender/age shared by a person."""
    return task.has_subtasks and {"mask", "gender", "age"} <= set(task.heads)


def resolve_group(setting: str, task: Task) -> bool:
    """Whether to try grouping: ``auto`` and ``on`` for the mask task; ``on`` elsewhere is an error."""
    if setting == "off":
        return False
    if not supports(task):
        if setting == "on":
            raise ConfigError(
                "persons.group=on needs the mask task (gender and age shared by a person's photos); set persons.group=off"
            )
        return False
    return True


def resolve_embedding(setting: str) -> str:
    """``fold`` or a face model's name: ``auto`` is the face model when its package is installed.

    Says in one line when ``auto`` falls back to the fold features; an explicit face model that
    cannot run is an error naming the package to install.
    """
    if setting == "fold":
        return "fold"
    name = FACE_MODEL if setting == "auto" else setting
    missing = face_model_missing(name)
    if missing is None:
        return name
    if setting != "auto":
        raise ConfigError(
            f"persons.embedding={setting}: {missing} ({FACE_MODELS_INSTALL}); or set persons.embedding=fold"
        )
    console.print(
        f"  [yellow]persons: {missing}; grouping by the fold models' features[/] "
        f"(identity grouping ARI 0.14 vs 0.99 on facemask): {FACE_MODELS_INSTALL}"
    )
    return "fold"


def face_features(
    paths: Sequence[str],
    rows: np.ndarray | None,
    config: Config,
    model: str,
    centre: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Face-model embeddings of ``paths[rows]``, centred on ``centre`` (default: their own mean) and
    L2-normalised; also the centre and how many were computed now (the rest came from the cache).

    Raw face embeddings all point one way (two sets' means are nearly parallel), which crowds their
    cosine distances: on facemask their best cuts sit near 0.03, centred near 0.3, where the cut
    grid (FACE_THRESHOLDS) resolves them; the grouping is as good (benchmarks/RESULTS.md#person-grouping).
    """
    detector = DEFAULT_DETECTOR if unavailable(DEFAULT_DETECTOR) is None else FALLBACK_DETECTOR
    raw, computed = face_embeddings(paths, rows, model=model, detector=detector, cache_dir=config.data.cache_dir)
    centre = raw.mean(0) if centre is None else np.asarray(centre, np.float32)
    shifted = raw - centre
    norms = np.linalg.norm(shifted, axis=1, keepdims=True)
    return shifted / np.where(norms > 0, norms, 1.0), centre, computed


def embed(
    module: ClassifierModule,
    cache: str | Path,
    rows: Sequence[int] | np.ndarray,
    *,
    batch_size: int = 128,
    device: torch.device | None = None,
    precision: str = "32-true",
) -> np.ndarray:
    """L2-normalised pooled backbone features (N, D) of cache rows: the input of the model's heads."""
    device = device or torch.device("cpu")
    module = module.to(device).eval()
    model = module.model
    out = []
    with inference_batches(cache, rows, batch_size, device, precision) as batches:
        for images in batches:
            features = model.pool(model.backbone(module._inputs(images))).float()
            out.append(torch.nn.functional.normalize(features.flatten(1), dim=1).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 1), np.float32)


def fold_embeddings(
    checkpoints: Sequence[Path], cache: str | Path, config: Config, rows: np.ndarray | None = None, count: int = 0
) -> np.ndarray:
    """Every fold model's normalised features side by side, scaled so the whole vector has unit norm."""
    precision = resolve_precision(config.train.precision, config.train.accelerator)
    device = inference_device(config.train.accelerator)
    rows = np.arange(count) if rows is None else rows
    parts = [
        embed(
            load_fold_module(c),
            cache,
            rows,
            batch_size=batch_of(config.train) * 2,
            device=device,
            precision=precision,
        )
        for c in checkpoints
    ]
    return np.concatenate(parts, axis=1) / np.sqrt(len(parts))


def mask_states(probs: np.ndarray, task: Task) -> np.ndarray:
    """Predicted mask head class (0 wear, 1 incorrect, 2 not worn) per photo."""
    return head_probs(probs, task, "mask").argmax(1)


def head_probs(probs: np.ndarray, task: Task, head: str) -> np.ndarray:
    """A head's marginal probabilities (N, K) from final-class probabilities (N, C)."""
    index = np.asarray(task.class_to_head[head])
    return np.stack([probs[:, index == k].sum(1) for k in range(len(task.heads[head]))], axis=1)


def group_tree(embeddings: np.ndarray, states: np.ndarray | None = None) -> np.ndarray:
    """Average-linkage tree (scipy linkage matrix) on cosine distance, with cannot-link pairs.

    Two photos both predicted ``incorrect`` or both ``not worn`` get a huge distance: a person has
    one photo of each, so such a pair is two persons (average linkage then never joins their groups
    below any useful threshold).
    """
    n = len(embeddings)
    if n < 2:
        return np.zeros((0, 4))
    distances = cosine_distances(embeddings)
    if states is not None:
        i, j = np.triu_indices(n, k=1)  # pdist's condensed order
        distances[(states[i] == states[j]) & (states[i] > 0)] = FORBIDDEN
    return linkage(distances, method="average")


def cosine_distances(embeddings: np.ndarray) -> np.ndarray:
    """Condensed cosine distances (pdist order, in [0, 2]), finite whatever the rows hold.

    A row that is all zeros (a tiny input can switch every ReLU off: seen with 32x24 real faces)
    or holds a non-finite value (an overflow under 16-bit autocast) has no direction: it is at
    distance 1.0 (orthogonal) from every photo, so it joins no group below the cuts searched and
    keeps its own prediction, instead of a NaN that the linkage rejects.
    """
    x = np.asarray(embeddings, dtype=np.float64)
    finite = np.isfinite(x).all(axis=1)
    norms = np.linalg.norm(np.where(finite[:, None], x, 0.0), axis=1)
    blank = ~finite | (norms <= 1e-12)
    unit = np.where(blank[:, None], 0.0, x / np.where(blank, 1.0, norms)[:, None])
    distances = np.clip(pdist(unit, "sqeuclidean") / 2.0, 0.0, 2.0)  # |a - b|^2 / 2 = 1 - cos on unit vectors
    if blank.any():
        i, j = np.triu_indices(len(x), k=1)
        distances[blank[i] | blank[j]] = 1.0
    return distances


def cut(tree: np.ndarray, n: int, threshold: float) -> np.ndarray:
    """Group ids (0..G-1) of ``n`` photos: the tree cut where the average distance exceeds ``threshold``."""
    if n < 2:
        return np.zeros(n, np.int64)
    return fcluster(tree, t=threshold, criterion="distance").astype(np.int64) - 1


def group_photos(embeddings: np.ndarray, probs: np.ndarray, task: Task, threshold: float) -> np.ndarray:
    """Person group id per photo."""
    return cut(group_tree(embeddings, mask_states(probs, task)), len(embeddings), threshold)


def pool(probs: np.ndarray, groups: np.ndarray, task: Task) -> np.ndarray:
    """Final-class probabilities with gender x age shared within each group.

    Per photo: its own mask marginal times its group's gender x age distribution, the normalised
    geometric mean (mean log-probability) of the members' joint gender x age distributions.
    """
    mask_index = np.asarray(task.class_to_head["mask"])
    ga_index = np.asarray(task.class_to_head["gender"]) * len(task.heads["age"]) + np.asarray(task.class_to_head["age"])
    n_ga = len(task.heads["gender"]) * len(task.heads["age"])
    joint = np.stack([probs[:, ga_index == k].sum(1) for k in range(n_ga)], axis=1)
    logs = np.log(np.clip(joint, 1e-8, None))
    sums = np.zeros((groups.max() + 1 if len(groups) else 0, n_ga))
    np.add.at(sums, groups, logs)
    mean = sums[groups] / np.bincount(groups)[groups][:, None]
    shared = np.exp(mean - mean.max(1, keepdims=True))
    shared /= shared.sum(1, keepdims=True)
    masks = head_probs(probs, task, "mask")
    return masks[:, mask_index] * shared[:, ga_index]


def purity(groups: np.ndarray, persons: np.ndarray) -> dict[str, float]:
    """How well groups match persons: adjusted Rand index, and the fraction of photos whose group is exactly their person."""
    frame = pd.DataFrame({"g": groups, "p": persons})
    exact_groups = frame.groupby("g")["p"].agg(lambda s: s.nunique() == 1)
    group_size = frame.groupby("g")["p"].transform("size")
    person_size = frame.groupby("p")["g"].transform("size")
    exact = frame["g"].map(exact_groups).to_numpy() & (group_size == person_size).to_numpy()
    return {
        "ari": float(adjusted_rand_score(persons, groups)),
        "exact": float(exact.mean()),
        "groups": int(frame["g"].nunique()),
        "persons": int(frame["p"].nunique()),
    }


@dataclass
class OofChoice:
    """The threshold chosen on OOF and what grouping did there."""

    threshold: float
    cv_before: dict[str, Any]
    cv_after: dict[str, Any]
    purity: dict[str, float]
    probs: np.ndarray  # grouped OOF probabilities, oof row order
    groups: np.ndarray  # group ids (unique across folds)
    sweep: list[dict[str, float]]  # threshold -> grouped CV macro F1 and ARI

    @property
    def gain(self) -> float:
        return self.cv_after["macro_f1"] - self.cv_before["macro_f1"]


def choose_threshold(
    oof: pd.DataFrame,
    embeddings: np.ndarray,
    persons: np.ndarray,
    task: Task,
    threshold: float | None = None,
    thresholds: Sequence[float] = THRESHOLDS,
) -> OofChoice:
    """Group each fold's OOF photos (never across folds: each fold has its own model) and score it.

    With ``threshold`` None the cut is the one with the best grouped CV macro F1 (ties: the
    smaller); ``oof`` is the run's oof.csv, ``embeddings`` its rows' features from their own fold's
    model, ``persons`` their person ids.
    """
    probs = oof[prob_columns(task.num_classes)].to_numpy()
    states = mask_states(probs, task)
    folds = oof["fold"].to_numpy()
    targets = oof["target"].to_numpy()
    trees = {k: group_tree(embeddings[folds == k], states[folds == k]) for k in np.unique(folds)}

    def grouped(t: float) -> tuple[np.ndarray, np.ndarray]:
        groups = np.zeros(len(oof), np.int64)
        offset = 0
        for k, tree in trees.items():
            rows = folds == k
            groups[rows] = cut(tree, int(rows.sum()), t) + offset
            offset = groups[rows].max() + 1
        return groups, pool(probs, groups, task)

    def scored(p: np.ndarray) -> dict[str, Any]:
        return cv_scores(oof.assign(**dict(zip(prob_columns(task.num_classes), p.T, strict=True))), task)

    sweep = []
    for t in [threshold] if threshold is not None else thresholds:
        groups, pooled = grouped(t)
        score = fold_macro_f1(targets, pooled, folds)  # the CV macro F1, fast: the sweep scores many cuts
        sweep.append({"threshold": t, "macro_f1": score, "ari": purity(groups, persons)["ari"]})
    best = max(sweep, key=lambda r: (round(r["macro_f1"], 6), -r["threshold"]))
    groups, pooled = grouped(best["threshold"])
    return OofChoice(best["threshold"], scored(probs), scored(pooled), purity(groups, persons), pooled, groups, sweep)


PERSON_FILES = ("test_raw.csv", "persons.csv", "oof_persons.csv")


def group_run(
    run_dir: Path,
    config: Config,
    task: Task,
    train: pd.DataFrame,
    train_cache: str | Path,
    test: pd.DataFrame | None,
    test_cache: str | Path | None,
    test_format: str,
    checkpoints: Sequence[Path],
) -> dict[str, Any] | None:
    """After training: choose the cut on OOF, then group and pool the run's test predictions.

    ``train`` is the source's training table (image_id, group = person, cache_row), ``test`` its
    test table in test.csv's order, ``checkpoints`` the finished folds' best.ckpt. Writes oof_persons.csv (grouped OOF, with the group ids); when
    grouping is applied also test_raw.csv (the ungrouped probabilities), persons.csv (image_id,
    person group) and test.csv/submission.csv rewritten from the grouped probabilities. Returns
    run.json's ``persons`` record, or None when grouping is off or not possible for this task.
    """
    for stale in PERSON_FILES:
        (run_dir / stale).unlink(missing_ok=True)
    if not resolve_group(config.persons.group, task):
        return None
    by_fold = {fold_id(c): c for c in checkpoints}
    oof = pd.read_csv(run_dir / "oof.csv", dtype={"image_id": str})
    table = train.set_index("image_id")
    embedding = resolve_embedding(config.persons.embedding)
    centre: np.ndarray | None = None
    computed = 0
    if embedding == "fold":
        embeddings = _fold_oof_embeddings(oof, table, by_fold, train_cache, config)
    else:
        positions = pd.Series(np.arange(len(train)), index=train["image_id"])
        rows = positions.loc[oof["image_id"]].to_numpy()
        embeddings, centre, computed = face_features(train["path"].tolist(), rows, config, embedding)
    persons = table.loc[oof["image_id"], "group"].astype(str).to_numpy()
    thresholds = THRESHOLDS if embedding == "fold" else FACE_THRESHOLDS
    choice = choose_threshold(oof, embeddings, persons, task, config.persons.threshold, thresholds)
    cols = prob_columns(task.num_classes)
    grouped_oof = oof[["image_id", "fold", "target"]].assign(person=choice.groups)
    outputs = {"oof_persons.csv": pd.concat([grouped_oof, pd.DataFrame(choice.probs, columns=cols)], axis=1)}
    applied = config.persons.group == "on" or choice.gain > 0
    record: dict[str, Any] = {
        "group": config.persons.group,
        "embedding": embedding,
        "applied": applied,
        "threshold": choice.threshold,
        "threshold_chosen_on_oof": config.persons.threshold is None,
        "cv_before": _summary(choice.cv_before),
        "cv_after": _summary(choice.cv_after),
        "purity": choice.purity,
    }
    if centre is not None:
        record["centre"] = [round(float(v), 6) for v in centre]  # pstage predict centres test photos on it too
    if applied and test is not None and test_cache is not None and (run_dir / "test.csv").exists():
        raw = pd.read_csv(run_dir / "test.csv", dtype={"image_id": str})
        probs = raw[cols].to_numpy()
        if embedding == "fold":
            features = fold_embeddings(list(by_fold.values()), test_cache, config, count=len(raw))
        else:
            features, _, done = face_features(test["path"].tolist(), None, config, embedding, centre)
            computed += done
        groups = group_photos(features, probs, task, choice.threshold)
        pooled = pool(probs, groups, task)
        outputs["test_raw.csv"] = raw
        outputs["persons.csv"] = pd.DataFrame({"image_id": raw["image_id"], "person": groups})
        outputs["test.csv"] = pd.concat([raw[["image_id"]], pd.DataFrame(pooled, columns=cols)], axis=1)
        outputs["submission.csv"] = submission_frame(test, pooled, task, test_format)
        record["test_groups"] = int(groups.max() + 1) if len(groups) else 0
    if embedding != "fold":
        record["embedded"] = computed  # photos the face model embedded in this call (0: all from the cache)
    # written only once everything is computed: a failure above leaves the run's files as they were
    for name, frame in outputs.items():
        write_csv(run_dir / name, frame, float_format="%.6g" if name in ("test_raw.csv", "test.csv") else None)
    return record


def _fold_oof_embeddings(
    oof: pd.DataFrame, table: pd.DataFrame, by_fold: dict[int, Path], train_cache: str | Path, config: Config
) -> np.ndarray:
    """Each OOF row's features from its own fold's model (in oof row order)."""
    precision = resolve_precision(config.train.precision, config.train.accelerator)
    device = inference_device(config.train.accelerator)
    embeddings = None
    for fold, checkpoint in by_fold.items():
        rows = (oof["fold"] == fold).to_numpy()
        part = embed(
            load_fold_module(checkpoint),
            train_cache,
            table.loc[oof.loc[rows, "image_id"], "cache_row"].to_numpy(),
            batch_size=batch_of(config.train) * 2,
            device=device,
            precision=precision,
        )
        embeddings = np.zeros((len(oof), part.shape[1]), np.float32) if embeddings is None else embeddings
        embeddings[rows] = part
    assert embeddings is not None, "group_run is called with at least one finished fold"
    return embeddings


def _summary(cv: dict[str, Any]) -> dict[str, Any]:
    return {"macro_f1": cv["macro_f1"], "per_task": cv["per_task"]}


def group_test(
    info: RunInfo | dict[str, Any],
    checkpoints: Sequence[Path],
    cache: str | Path,
    config: Config,
    probs: np.ndarray,
    task: Task,
    paths: Sequence[str] | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """``pstage predict``: test probabilities grouped as training decided (run.json ``persons``), and the groups.

    ``paths``: the photos' files, in ``probs`` order (a face-model embedding reads them again).
    """
    decided = info.get("persons") or {}
    if not decided.get("applied") or not supports(task) or len(probs) < 2:
        return probs, None
    embedding = decided.get("embedding", "fold")  # a run.json without it grouped by fold features
    if embedding == "fold":
        features = fold_embeddings(checkpoints, cache, config, count=len(probs))
    else:
        if paths is None:
            raise ValueError("group_test needs the photos' paths for a face-model embedding")
        resolve_embedding(embedding)  # an error naming the package when it is missing here
        features, _, _ = face_features(paths, None, config, embedding, np.asarray(decided["centre"], np.float32))
    groups = group_photos(features, probs, task, float(decided["threshold"]))
    return pool(probs, groups, task), groups


def describe_grouping(record: dict[str, Any]) -> str:
    """One console line: the OOF CV without and with grouping, the purity, and whether test is grouped."""
    before, after = record["cv_before"], record["cv_after"]
    tasks = ", ".join(
        f"{h} {before['per_task'][h]:.3f}->{after['per_task'][h]:.3f}"
        for h in ("gender", "age")
        if h in after["per_task"]
    )
    verdict = "applied to test" if record["applied"] else "not applied (no OOF gain)"
    return (
        f"persons ({record.get('embedding', 'fold')}): OOF CV {before['macro_f1']:.4f} -> {after['macro_f1']:.4f} grouped ({tasks}; "
        f"cut {record['threshold']:g}, ARI {record['purity']['ari']:.3f}, {record['purity']['exact']:.0%} photos in exactly their person's group): {verdict}"
    )
