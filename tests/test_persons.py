"""Person-consistent predictions: grouping and pooling on constructed cases where the answer is known."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from pstage.core.errors import ConfigError
from pstage.core.metrics import prob_columns
from pstage.core.tasks import label_task, mask_label, mask_task
from pstage.data.identity import face_model_missing
from pstage.inference.persons import choose_threshold, group_photos, pool, purity, resolve_group

TASK = mask_task()
STEMS = [0, 0, 0, 0, 0, 1, 2]  # a person's mask states: 5 worn, 1 incorrect, 1 not worn


def persons_case(persons: int = 60, noise: float = 0.25, seed: int = 0) -> dict[str, np.ndarray]:
    """Photos of persons: embeddings near a per-person centre, probabilities that get gender/age
    right on only some of a person's photos (the most confident ones), mask always right."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(persons, 32))
    person = np.repeat(np.arange(persons), 7)
    mask = np.tile(STEMS, persons)
    gender = rng.integers(0, 2, persons)[person]
    age = rng.integers(0, 3, persons)[person]
    embeddings = centres[person] + noise * rng.normal(size=(len(person), 32))
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    probs = np.full((len(person), 18), 0.01)
    wrong = rng.random(len(person)) < 0.35  # a third of the photos lean to a wrong gender/age, weakly
    truth = mask_label(mask, gender, age)
    lean = mask_label(mask, 1 - gender, (age + 1) % 3)
    probs[np.arange(len(person)), truth] += np.where(wrong, 0.3, 0.8)
    probs[np.arange(len(person)), lean] += np.where(wrong, 0.45, 0.05)
    probs /= probs.sum(1, keepdims=True)
    return {"embeddings": embeddings, "probs": probs, "person": person, "truth": truth, "mask": mask}


def test_groups_recover_persons_and_pooling_fixes_the_weak_photos():
    case = persons_case()
    groups = group_photos(case["embeddings"], case["probs"], TASK, threshold=0.5)
    score = purity(groups, case["person"])
    assert score["ari"] > 0.95 and score["exact"] > 0.9, score
    pooled = pool(case["probs"], groups, TASK)
    np.testing.assert_allclose(pooled.sum(1), 1.0, atol=1e-6)
    before = (case["probs"].argmax(1) == case["truth"]).mean()
    after = (pooled.argmax(1) == case["truth"]).mean()
    assert before < 0.7 and after > 0.97, (before, after)
    # each photo keeps its own mask probabilities
    masks = np.asarray(TASK.class_to_head["mask"])
    for k in range(3):
        np.testing.assert_allclose(pooled[:, masks == k].sum(1), case["probs"][:, masks == k].sum(1), atol=1e-6)
    # within a group every photo has the same gender x age distribution
    genders = np.asarray(TASK.class_to_head["gender"])
    group0 = groups == groups[0]
    female = pooled[group0][:, genders == 1].sum(1)
    np.testing.assert_allclose(female, female[0], atol=1e-6)


def test_two_unmasked_photos_never_share_a_group():
    """Identical embeddings, but both not worn: a person has one such photo, so they are two persons."""
    case = persons_case(persons=2, noise=0.0)
    twins = np.concatenate([case["embeddings"][:7], case["embeddings"][:7]])  # two persons who look the same
    probs = np.concatenate([case["probs"][:7], case["probs"][:7]])
    groups = group_photos(twins, probs, TASK, threshold=0.5)
    states = np.tile(STEMS, 2)
    assert groups[states == 2][0] != groups[states == 2][1]
    assert groups[states == 1][0] != groups[states == 1][1]


def test_photos_without_features_stay_alone_and_the_rest_still_group():
    """Zero vectors (a tiny input switching every ReLU off, seen at 32x24 on real faces) and non-finite
    ones have no cosine: they must neither crash the linkage (NaN distances) nor join anyone."""
    case = persons_case(persons=20, seed=3)
    embeddings = case["embeddings"].copy()
    blank = np.zeros(len(embeddings), bool)
    blank[[0, 1, 9, 30]] = True  # two photos of person 0, one of person 1, one of person 4
    embeddings[[0, 1, 9]] = 0.0
    embeddings[30, 5] = np.nan
    groups = group_photos(embeddings, case["probs"], TASK, threshold=0.5)
    sizes = np.bincount(groups)
    assert (sizes[groups[blank]] == 1).all(), "a photo without features joined a group"
    rest = ~blank
    assert purity(groups[rest], case["person"][rest])["ari"] > 0.95
    # every photo blank (a degenerate model): one group per photo, never an error
    zeros = np.zeros_like(embeddings)
    assert len(np.unique(group_photos(zeros, case["probs"], TASK, threshold=0.5))) == len(zeros)
    choice = choose_threshold(
        pd.DataFrame(
            {"image_id": map(str, range(len(zeros))), "fold": case["person"] % 2, "target": case["truth"]}
        ).join(pd.DataFrame(case["probs"], columns=prob_columns(18))),
        zeros,
        case["person"].astype(str),
        TASK,
    )
    assert choice.purity["groups"] == len(zeros)


def test_threshold_chosen_on_oof_raises_the_cv():
    case = persons_case(persons=80, seed=1)
    fold = (case["person"] % 2).astype(int)  # persons never cross folds
    oof = pd.concat(
        [
            pd.DataFrame({"image_id": [f"i{i}" for i in range(len(fold))], "fold": fold, "target": case["truth"]}),
            pd.DataFrame(case["probs"], columns=prob_columns(18)),
        ],
        axis=1,
    )
    choice = choose_threshold(oof, case["embeddings"], case["person"], TASK)
    assert choice.gain > 0.2, (choice.cv_before["macro_f1"], choice.cv_after["macro_f1"])
    assert choice.cv_after["per_task"]["gender"] > 0.97 and choice.purity["ari"] > 0.95
    assert choice.cv_after["per_task"]["mask"] == choice.cv_before["per_task"]["mask"]
    # groups never span folds
    assert pd.Series(fold).groupby(choice.groups).nunique().max() == 1
    # far too small a cut leaves every photo alone: no gain
    alone = choose_threshold(oof, case["embeddings"], case["person"], TASK, threshold=1e-6)
    assert alone.purity["groups"] == len(oof) and alone.gain == pytest.approx(0.0)


def test_group_setting_needs_the_mask_task():
    assert resolve_group("auto", TASK) and not resolve_group("off", TASK)
    assert not resolve_group("auto", label_task(["a", "b"]))
    with pytest.raises(ConfigError, match="persons.group=on needs the mask task"):
        resolve_group("on", label_task(["a", "b"]))


def test_training_records_the_grouped_cv_and_groups_test_photos_by_person(learned, learn_root):
    """The shared end-to-end run (persons.group=auto): OOF CV before/after grouping, purity, test grouped when it won."""
    run, out = learned
    info = json.loads((run / "run.json").read_text())
    persons = info["persons"]
    assert persons["cv_before"]["macro_f1"] == pytest.approx(info["cv"]["macro_f1"])
    assert set(persons["cv_after"]["per_task"]) == {"mask", "gender", "age"}
    # purity is measured and recorded; on this tiny demo model (test_resnet, 64x48) the pooled
    # features are near chance as identity features (ARI ~0), which is why auto must decide on OOF
    assert -1.0 <= persons["purity"]["ari"] <= 1.0 and 0.0 <= persons["purity"]["exact"] <= 1.0, persons
    # the packaged face model groups when installed (make venv installs it), else the fold features
    expected = "fold" if face_model_missing("dlib_resnet") else "dlib_resnet"
    assert persons["embedding"] == expected and f"persons ({expected}): OOF CV" in out.stdout
    if expected == "dlib_resnet":  # centred on the training photos' mean, which predict reuses
        assert len(persons["centre"]) == 128 and persons["embedded"] >= 0
    grouped_oof = pd.read_csv(run / "oof_persons.csv")
    assert len(grouped_oof) == len(pd.read_csv(run / "oof.csv")) and "person" in grouped_oof
    # auto applies it exactly when it raised the OOF CV, and then keeps the ungrouped test probabilities
    applied = persons["cv_after"]["macro_f1"] > persons["cv_before"]["macro_f1"]
    assert persons["applied"] == applied == (run / "test_raw.csv").exists() == (run / "persons.csv").exists()
    test = pd.read_csv(run / "test.csv")
    submission = pd.read_csv(run / "submission.csv")
    assert (submission["ans"].to_numpy() == test[prob_columns(18)].to_numpy().argmax(1)).all()
