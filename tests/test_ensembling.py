"""Ensembles on constructed OOF probabilities whose best blend is known, plus the safety checks.

The runs here are hand-written run directories (run.json, folds.csv, oof.csv, test.csv), so every
expectation is exact and the tests take milliseconds; the demo test ensembles real trained runs.
"""

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.linear_model import LogisticRegression

import pstage
from pstage.core.errors import ConfigError, RunError
from pstage.core.metrics import fast_macro_f1, fold_macro_f1, macro_f1
from pstage.core.tasks import label_task
from pstage.ensembling.ensemble import calibrate_apply, calibrate_fit, hill_climb
from tests.conftest import run_cli

TASK = label_task(["a", "b", "c"])
N = 300  # 100 images per class, 3 folds of 100


def targets_and_folds() -> tuple[np.ndarray, np.ndarray]:
    targets = np.arange(N) % 3
    folds = (np.arange(N) // 3) % 3
    return targets, folds


def constructed_members() -> dict[str, np.ndarray]:
    """A: right on a/b, wrong on c. B: right only on c. C: noise. A+B 50/50 is right everywhere."""
    targets, _ = targets_and_folds()
    rng = np.random.default_rng(0)
    a, b = np.zeros((N, 3)), np.zeros((N, 3))
    for i, t in enumerate(targets):
        if t < 2:
            a[i] = 0.15
            a[i, t] = 0.7
            b[i] = 0.25
            b[i, t], b[i, 2] = 0.35, 0.4
        else:
            a[i] = [0.5, 0.3, 0.2]
            b[i] = [0.05, 0.05, 0.9]
    c = rng.dirichlet(np.ones(3), size=N)
    return {"A": a, "B": b, "C": c}


def write_run(runs, name, probs, *, folds=None, classes=None, status="done", test=True):
    """A minimal finished run directory in the contract's format."""
    targets, default_folds = targets_and_folds()
    folds = default_folds if folds is None else folds
    run = runs / name
    run.mkdir(parents=True)
    ids = [f"img{i:04d}" for i in range(N)]
    pd.DataFrame({"image_id": ids, "group": [f"p{i // 7}" for i in range(N)], "fold": folds}).to_csv(
        run / "folds.csv", index=False
    )
    cols = [f"p_{c}" for c in range(probs.shape[1])]
    oof = pd.concat(
        [pd.DataFrame({"image_id": ids, "fold": folds, "target": targets}), pd.DataFrame(probs, columns=cols)], axis=1
    )
    oof.to_csv(run / "oof.csv", index=False)
    if test:
        test_probs = probs[:30]
        pd.concat(
            [pd.DataFrame({"image_id": [f"t{i}.jpg" for i in range(30)]}), pd.DataFrame(test_probs, columns=cols)],
            axis=1,
        ).to_csv(run / "test.csv", index=False)
        pd.DataFrame({"image_id": [f"t{i}.jpg" for i in range(30)], "label": ["a"] * 30}).to_csv(
            run / "submission.csv", index=False
        )
    task = label_task(classes or TASK.classes)
    preds = probs.argmax(1)
    cv = {"macro_f1": fold_macro_f1(targets, probs, folds), "macro_f1_std": 0.0, "per_task": {}}
    assert cv["macro_f1"] >= 0 and len(preds) == N
    info = {
        "name": name,
        "status": status,
        "task": task.to_dict(),
        "classes": task.classes,
        "cv": cv,
        "model": "m",
        "user": "u",
    }
    (run / "run.json").write_text(json.dumps(info))
    return run


@pytest.fixture
def runs(tmp_path):
    for name, probs in constructed_members().items():
        write_run(tmp_path, name, probs)
    return tmp_path


def test_fast_macro_f1_matches_scikit_learn():
    rng = np.random.default_rng(1)
    for _ in range(20):
        t, p = rng.integers(0, 18, 500), rng.integers(0, 18, 500)
        p[:50] = 17  # a class predicted but maybe never true
        assert fast_macro_f1(t, p, 18) == pytest.approx(macro_f1(t, p))


def test_hill_climb_finds_the_known_best_blend():
    targets, folds = targets_and_folds()
    members = constructed_members()
    single = {name: fold_macro_f1(targets, p, folds) for name, p in members.items()}
    weights, history = hill_climb(list(members.values()), targets, folds, rounds=20)
    assert weights.tolist() == [0.5, 0.5, 0.0]  # A + B, no noise
    assert history[0]["added"] == 0 and history[-1]["score"] == 1.0 > max(single.values())
    assert len(history) == 2  # the shortest best prefix


def test_ensemble_run_directory_and_scores(runs):
    result = pstage.ensemble(["A", "B", "C"], method="hill", name="ens", runs_dir=runs)
    assert result.weights == {"A": 0.5, "B": 0.5, "C": 0.0}
    assert result.cv["macro_f1"] == 1.0 and result.nested_cv == 1.0
    run = runs / "ens"
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "done" and info["kind"] == "ensemble" and info["cv"]["macro_f1"] == 1.0
    assert [m["run"] for m in info["ensemble"]["members"]] == ["A", "B", "C"]
    assert (run / "folds.csv").read_text() == (runs / "A" / "folds.csv").read_text()
    oof = pd.read_csv(run / "oof.csv")
    assert (oof.filter(like="p_").to_numpy().argmax(1) == oof["target"]).all()
    test = pd.read_csv(run / "test.csv")
    a, b = (pd.read_csv(runs / n / "test.csv").filter(like="p_").to_numpy() for n in "AB")
    assert np.allclose(test.filter(like="p_").to_numpy(), (a + b) / 2, atol=1e-5)
    submission = pd.read_csv(run / "submission.csv")
    assert submission.columns.tolist() == ["image_id", "label"] and len(submission) == 30
    assert pd.read_csv(run / "weights.csv")["weight"].tolist() == [0.5, 0.5, 0.0]
    # an ensemble is a run: it can be a member of another ensemble
    again = pstage.ensemble(["ens", "C"], method="mean", name="ens2", runs_dir=runs)
    assert again.members_cv["ens"] == 1.0


def test_mean_and_stack(runs):
    mean = pstage.ensemble(["A", "B"], method="mean", name="m", runs_dir=runs)
    assert mean.weights == {"A": 0.5, "B": 0.5} and mean.cv["macro_f1"] == 1.0
    stack = pstage.ensemble(["A", "B", "C"], method="stack", name="s", runs_dir=runs)
    # the stacker's OOF is nested (fitted without the scored fold) and still near perfect here
    assert stack.cv["macro_f1"] == pytest.approx(stack.nested_cv) and stack.nested_cv > 0.95
    # run.json holds the fitted stacker: re-applying it to the members' test probabilities gives test.csv
    model = json.loads((runs / "s" / "run.json").read_text())["ensemble"]["stacker"]
    members = [pd.read_csv(runs / n / "test.csv").filter(like="p_").to_numpy() for n in "ABC"]
    logits = (
        np.log(np.clip(np.concatenate(members, 1), model["clip"], 1)) @ np.array(model["coef"]).T + model["intercept"]
    )
    again = np.exp(logits - logits.max(1, keepdims=True))
    again /= again.sum(1, keepdims=True)
    assert np.allclose(pd.read_csv(runs / "s" / "test.csv").filter(like="p_").to_numpy(), again, atol=1e-4)


def test_calibration_fixes_an_underestimated_class():
    targets, folds = targets_and_folds()
    probs = np.array([[0.6, 0.1, 0.3], [0.2, 0.7, 0.1], [0.45, 0.15, 0.4]])[targets]
    weights = calibrate_fit(probs, targets, folds)
    assert weights[2] > weights[0]
    assert fold_macro_f1(targets, calibrate_apply(probs, weights), folds) == 1.0 > fold_macro_f1(targets, probs, folds)


def test_calibrated_ensemble_reports_nested_score(runs, tmp_path):
    targets, _ = targets_and_folds()
    skewed = np.array([[0.6, 0.1, 0.3], [0.2, 0.7, 0.1], [0.45, 0.15, 0.4]])[targets]
    write_run(tmp_path, "skewed", skewed)
    result = pstage.ensemble(["skewed"], method="mean", name="cal", runs_dir=tmp_path, calibrate=True)
    assert result.calibration["cv_before"] < 0.7 and result.calibration["cv_nested"] == 1.0
    with pytest.raises(ConfigError, match="at least two runs"):
        pstage.ensemble(["skewed"], runs_dir=tmp_path)


def test_mismatched_split_is_refused_naming_the_image(runs):
    _, folds = targets_and_folds()
    moved = folds.copy()
    moved[7] = (moved[7] + 1) % 3
    write_run(runs, "other-split", constructed_members()["A"], folds=moved)
    with pytest.raises(
        RunError,
        match=r"A and other-split do not share a split: image img0007 is in fold 2 in A but in fold 0 in other-split",
    ):
        pstage.ensemble(["A", "other-split"], runs_dir=runs)
    out = run_cli("ensemble", "A", "other-split", "--runs", str(runs))
    assert out.returncode == 2 and "img0007" in out.stderr and "Traceback" not in out.stderr
    assert not (runs / "ens").exists()


def test_other_refusals(runs):
    write_run(runs, "other-classes", constructed_members()["A"], classes=["a", "b", "x"])
    with pytest.raises(RunError, match="predict different classes \\('c' vs 'x'\\)"):
        pstage.ensemble(["A", "other-classes"], runs_dir=runs)
    write_run(runs, "running", constructed_members()["A"], status="running")
    with pytest.raises(RunError, match="running: run is running; only finished runs"):
        pstage.ensemble(["A", "running"], runs_dir=runs)
    with pytest.raises(ConfigError, match="given twice"):
        pstage.ensemble(["A", "A"], runs_dir=runs)
    with pytest.raises(ConfigError, match="--method vote: expected one of mean, hill, stack"):
        pstage.ensemble(["A", "B"], method="vote", runs_dir=runs)
    with pytest.raises(RunError, match="holds a training run"):
        pstage.ensemble(["A", "B"], name="C", runs_dir=runs)
    with pytest.raises(RunError, match="oof_tta.csv is missing; run pstage predict A --tta first"):
        pstage.ensemble(["A", "B"], runs_dir=runs, tta=True)


def test_cli_ensemble(runs):
    out = run_cli("ensemble", "A", "B", "C", "--runs", str(runs), "--name", "cli-ens", "--out", str(runs / "sub.csv"))
    assert out.returncode == 0, out.stderr[-2000:]
    assert (
        "ensemble CV macro F1 1.0000" in out.stdout
        and "best member A" in out.stdout
        and "nested CV 1.0000" in out.stdout
    )
    assert (runs / "sub.csv").read_text() == (runs / "cli-ens" / "submission.csv").read_text()


def _estimators() -> dict[str, object]:
    """Every registered ensemble method, and the --calibrate estimator (one member's probabilities)."""
    from pstage.ensembling.methods import METHODS, ClassWeights

    return {**{name: METHODS.get(name) for name in METHODS.names()}, "calibrate": ClassWeights}


@pytest.mark.parametrize("name", list(_estimators()))
@pytest.mark.parametrize("classes", [3, 2])
def test_every_method_torch_graph_equals_its_numpy_output(name, classes):
    """to_torch() (what export puts in the ONNX graph) computes predict_proba's numbers, on any leading shape."""
    import torch

    rng = np.random.default_rng(3)
    targets, folds = targets_and_folds()
    if classes == 3:
        targets = np.where(targets == 2, 0, targets)  # class 2 never a target: the stacker must give it 0
    else:
        targets = targets % 2  # two classes: scikit-learn's binary form of the stacker (one logit)
    members = 1 if name == "calibrate" else 3
    probs = [rng.dirichlet(np.ones(classes), size=N) for _ in range(members)]
    method = _estimators()[name]().fit(probs, targets, folds)
    graph = method.to_torch()
    fresh = [rng.dirichlet(np.ones(classes), size=(7, 4)) for _ in range(members)]  # (N, K folds, C), as fold_probs
    for batch in (fresh, [p[:, 0] for p in fresh]):
        expected = method.predict_proba(batch)
        with torch.no_grad():
            got = graph([torch.tensor(p, dtype=torch.float32) for p in batch]).numpy()
        assert got.shape == expected.shape == (*batch[0].shape[:-1], classes)
        assert np.allclose(got, expected, atol=1e-5)
        assert np.allclose(expected.sum(-1), 1.0)
    if name == "stack" and classes == 3:
        assert (method.predict_proba(fresh)[..., 2] == 0).all()  # a class the stacker never saw gets 0


def test_stacker_record_restores_the_fitted_method():
    """run.json's stacker (what export and serve rebuild from) gives the fitted stacker's probabilities."""
    from pstage.ensembling.methods import Stack

    targets, folds = targets_and_folds()
    probs = list(constructed_members().values())
    stack = Stack().fit(probs, targets, folds)
    restored = Stack.restore([1 / 3] * 3, json.loads(json.dumps(stack.record())), 3)
    assert np.allclose(restored.predict_proba(probs), stack.predict_proba(probs), atol=1e-4)
    # the stacker is scikit-learn's logistic regression: its own predict_proba agrees with the shared maths
    features = np.log(np.clip(np.concatenate(probs, 1), 1e-6, 1))
    fitted = LogisticRegression(C=1.0, max_iter=2000, class_weight="balanced").fit(features, targets)
    assert np.allclose(fitted.predict_proba(features), stack.predict_proba(probs), atol=1e-6)
