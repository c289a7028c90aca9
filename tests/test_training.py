"""End-to-end training on generated competition data: the run contract, scores, resume rules, switches.

``learned`` is one real CLI run (see conftest); the other tests train seconds-fast smoke runs
through the Python API.
"""

import json

import numpy as np
import pandas as pd
import pytest
import torch

import pstage
from pstage.core.errors import ConfigError, DataError, RunError
from pstage.core.metrics import macro_f1
from pstage.models.checkpoint import load_fold_module
from tests.conftest import FAST, LEARN, run_cli

CHANCE = 1 / 18


def test_cv_macro_f1_is_far_above_chance(learned):
    run, out = learned
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "done"
    assert info["cv"]["macro_f1"] > 3 * CHANCE, info["cv"]
    assert info["cv"]["per_task"]["mask"] > 0.5 and info["cv"]["per_task"]["gender"] > 0.7, info["cv"]["per_task"]
    assert f"CV macro F1 {info['cv']['macro_f1']:.4f}" in out.stdout


def test_run_directory_contract(learned, learn_root):
    run, _ = learned
    demo_root = learn_root
    info = json.loads((run / "run.json").read_text())
    for key in (
        "name",
        "status",
        "created",
        "finished",
        "user",
        "host",
        "git_sha",
        "pstage_version",
        "task",
        "classes",
        "cv",
        "duration_s",
    ):
        assert key in info, key
    assert info["status"] == "done" and len(info["classes"]) == 18
    assert set(info["cv"]) >= {"macro_f1", "macro_f1_std", "folds", "per_task"}
    assert [f["fold"] for f in info["cv"]["folds"]] == [0, 1, 2]
    assert set(info["cv"]["per_task"]) == {"mask", "gender", "age"}

    source = pstage.load_source(pstage.load_config(None, [f"data.path={demo_root}"]).data)
    folds = pd.read_csv(run / "folds.csv", dtype={"image_id": str, "group": str})
    assert list(folds.columns) == ["image_id", "group", "fold"]
    assert (folds.groupby("group")["fold"].nunique() == 1).all()

    oof = pd.read_csv(run / "oof.csv")
    assert list(oof.columns[:3]) == ["image_id", "fold", "target"] and oof.shape[1] == 3 + 18
    assert sorted(oof["image_id"]) == sorted(source.train["image_id"])  # every training image, once
    assert np.allclose(oof.filter(like="p_").sum(1), 1, atol=1e-3)
    merged = oof.merge(folds, on="image_id", suffixes=("", "_split"))
    assert (merged["fold"] == merged["fold_split"]).all()  # predicted by the model that never saw it

    test = pd.read_csv(run / "test.csv")
    info_csv = pd.read_csv(demo_root / "eval" / "info.csv")
    assert test["image_id"].tolist() == info_csv["ImageID"].tolist()
    submission = pd.read_csv(run / "submission.csv")
    assert list(submission.columns) == ["ImageID", "ans"]
    assert submission["ImageID"].tolist() == info_csv["ImageID"].tolist()
    assert (submission["ans"] == test.filter(like="p_").to_numpy().argmax(1)).all()

    for k in range(3):
        fold = run / f"fold_{k}"
        assert (fold / "best.ckpt").exists() and (fold / "metrics.json").exists()
        assert not (fold / "last.ckpt").exists()  # only needed while the fold trains
        history = json.loads((fold / "metrics.json").read_text())["history"]
        assert [row["epoch"] for row in history] == list(range(12))
    assert list((run / "logs").glob("fold_0/events.out.tfevents.*"))  # TensorBoard by default
    config = pstage.load_config(run / "config.yaml")
    assert config.model.name == "test_resnet" and config.data.path == str(demo_root.resolve())


def test_test_predictions_beat_chance_on_hidden_truth(learned, learn_root):
    run, _ = learned
    truth = pd.read_csv(learn_root / "demo_truth.csv")
    submission = pd.read_csv(run / "submission.csv").merge(truth, on="ImageID", suffixes=("", "_true"))
    assert (submission["ans"] // 6 == submission["ans_true"] // 6).mean() > 5 / 7  # beats always-"wear"


def test_predict_recreates_the_submission(learned, learn_root, tmp_path):
    run, _ = learned
    original = pd.read_csv(run / "submission.csv")
    out = pstage.predict(run, learn_root, out=tmp_path / "again.csv")
    assert out.kind == "submission"
    assert pd.read_csv(out.path).equals(original)


def test_predict_any_folder_of_images(learned, learn_root, tmp_path):
    run, _ = learned
    person = sorted((learn_root / "train" / "images").iterdir())[0]
    out = pstage.predict(run, person, out=tmp_path / "p.csv")
    frame = pd.read_csv(out.path)
    assert out.kind == "predictions" and len(frame) == 7
    assert {"image_id", "class", "label", "mask", "gender", "age", "p_0", "p_17"} <= set(frame.columns)
    assert np.allclose(frame.filter(like="p_").sum(1), 1, atol=1e-3)


def test_tta_changes_predictions_and_measures_its_gain_on_oof(learned, learn_root, tmp_path):
    run, _ = learned
    out = run_cli("predict", str(run), "--tta")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "2 views (hflip)" in out.stdout and "without TTA" in out.stdout and "with TTA" in out.stdout
    info = json.loads((run / "run.json").read_text())
    oof, oof_tta = pd.read_csv(run / "oof.csv"), pd.read_csv(run / "oof_tta.csv")
    assert oof_tta[["image_id", "fold", "target"]].equals(oof[["image_id", "fold", "target"]])
    probs, probs_tta = oof.filter(like="p_").to_numpy(), oof_tta.filter(like="p_").to_numpy()
    assert not np.allclose(probs, probs_tta) and np.allclose(probs_tta.sum(1), 1, atol=1e-3)
    score = macro_f1(oof_tta["target"].to_numpy(), probs_tta.argmax(1))
    assert info["tta"]["cv"]["oof_macro_f1"] == pytest.approx(score)
    assert f"{info['cv']['macro_f1']:.4f} without TTA, {info['tta']['cv']['macro_f1']:.4f} with TTA" in out.stdout
    submission = pd.read_csv(run / "submission_tta.csv")
    assert len(submission) == 42 and (run / "test_tta.csv").exists()
    person = sorted((learn_root / "train" / "images").iterdir())[0]
    plain = pstage.predict(run, person, out=tmp_path / "a.csv").frame.filter(like="p_").to_numpy()
    flipped = pstage.predict(run, person, tta=True, out=tmp_path / "b.csv").frame.filter(like="p_").to_numpy()
    assert not np.allclose(plain, flipped)
    assert np.allclose(flipped.sum(1), 1, atol=1e-3)


def test_tta_train_puts_the_views_into_the_runs_own_predictions(demo_root, tmp_path):
    """tta.train=true: oof.csv, the CV and submission.csv are what `pstage predict --tta` makes of
    the same run trained without it, and a plain `pstage predict` re-creates them."""
    overrides = [*FAST, "split.folds=2", "train.folds=[0]"]
    plain = pstage.train(data=demo_root, runs=tmp_path, name="plain", overrides=[*overrides, "tta.train=false"])
    pstage.predict(plain.path, tta=True)
    views = pstage.train(data=demo_root, runs=tmp_path, name="views", overrides=[*overrides, "tta.train=true"])
    oof_tta, oof = pd.read_csv(plain.path / "oof_tta.csv"), pd.read_csv(views.path / "oof.csv")
    assert oof[["image_id", "fold", "target"]].equals(oof_tta[["image_id", "fold", "target"]])
    assert np.allclose(oof.filter(like="p_").to_numpy(), oof_tta.filter(like="p_").to_numpy(), atol=1e-5)
    plain_oof = pd.read_csv(plain.path / "oof.csv").filter(like="p_").to_numpy()
    assert not np.allclose(plain_oof, oof.filter(like="p_").to_numpy(), atol=1e-3)
    assert pd.read_csv(views.path / "submission.csv").equals(pd.read_csv(plain.path / "submission_tta.csv"))
    again = pstage.predict(views.path, out=tmp_path / "again.csv")
    assert again.tta == "2 views (hflip)"
    assert pd.read_csv(again.path).equals(pd.read_csv(views.path / "submission.csv"))


def test_zoom_keeps_the_size_and_centre():
    from pstage.inference.predict import zoom

    images = torch.zeros(2, 8, 6, 3, dtype=torch.uint8)
    images[:, 3:5, 2:4] = 255  # a bright centre
    for scale in (0.8, 1.0, 1.25):
        out = zoom(images, scale)
        assert out.shape == images.shape and out.dtype == torch.uint8
        assert out[:, 3:5, 2:4].float().mean() > 100  # the centre stays in the centre
    assert zoom(images, 1.5)[:, 2:6, 1:5].float().mean() > zoom(images, 1.0)[:, 2:6, 1:5].float().mean()


def test_same_name_same_settings_is_a_no_op(learned, learn_root):
    run, _ = learned
    before = (run / "run.json").stat().st_mtime_ns
    info = json.loads((run / "run.json").read_text())
    again = pstage.train(data=learn_root, runs=run.parent, name="base", overrides=LEARN)
    assert again.cv == info["cv"]
    assert (run / "run.json").stat().st_mtime_ns == before


def test_same_name_other_settings_is_refused(learned, learn_root):
    run, _ = learned
    with pytest.raises(RunError, match=r"was trained with optim.lr=0.01; this command asks optim.lr=0.02"):
        pstage.train(data=learn_root, runs=run.parent, name="base", overrides=[*LEARN, "optim.lr=0.02"])


def test_multi_head_focal_ema_balanced_run(demo_root, tmp_path):
    """The less common switches train end to end and still learn."""
    overrides = [
        *FAST,
        "model.head=multi",
        "model.pool=gem",
        "loss.name=focal",
        "loss.class_weights=balanced",
        "train.sampler=balanced",
        "train.ema=true",
        "train.ema_decay=0.9",
        "augment.cutmix.p=0.5",
        "augment.mixup.p=0.3",
        "train.folds=[0]",
        "train.gradient_clip_val=1.0",
        "train.accumulate_grad_batches=2",
        "log.loggers=[csv]",
    ]
    result = pstage.train(data=demo_root, runs=tmp_path, name="multi", overrides=overrides)
    assert result.cv["folds"][0]["fold"] == 0 and len(result.cv["folds"]) == 1
    model = load_fold_module(result.path / "fold_0" / "best.ckpt").model
    assert set(model.heads) == {"mask", "gender", "age"} and hasattr(model.pool, "p")  # multi-head + GeM
    oof = pd.read_csv(result.path / "oof.csv")
    assert np.allclose(oof.filter(like="p_").sum(1), 1, atol=1e-3)  # product of heads is a distribution
    assert (result.path / "logs" / "csv" / "fold_0" / "metrics.csv").exists()


def test_only_some_folds_then_the_rest(demo_root, tmp_path):
    first = pstage.train(data=demo_root, runs=tmp_path, name="part", overrides=[*FAST, "train.folds=[1]"])
    assert [f["fold"] for f in first.cv["folds"]] == [1]
    oof = pd.read_csv(first.path / "oof.csv")
    assert set(oof["fold"]) == {1}
    stamp = (first.path / "fold_1" / "metrics.json").stat().st_mtime_ns
    rest = pstage.train(data=demo_root, runs=tmp_path, name="part", overrides=FAST)
    assert [f["fold"] for f in rest.cv["folds"]] == [0, 1, 2]
    assert (first.path / "fold_1" / "metrics.json").stat().st_mtime_ns == stamp  # kept, not retrained


def test_unknown_model_and_optimizer_fail_before_any_work(demo_root, tmp_path):
    with pytest.raises(ConfigError, match="timm has no model 'resnet1'"):
        pstage.train(data=demo_root, runs=tmp_path, name="x", overrides=["model.name=resnet1"])
    with pytest.raises(ConfigError, match="timm has no optimizer 'adamx'"):
        pstage.train(data=demo_root, runs=tmp_path, name="x", overrides=["optim.name=adamx"])
    assert not (tmp_path / "x").exists()


def test_image_folder_dataset_trains(tmp_path, demo_root):
    """A generic image-folder tree: one label, single head, generic submission."""
    import shutil

    source = pstage.load_source(pstage.load_config(None, [f"data.path={demo_root}"]).data)
    for row in source.train.itertuples():
        cls = ["wear", "incorrect", "none"][row.mask]
        target = tmp_path / "folder" / "train" / cls / f"{row.group}_{row.image_id.split('/')[1]}.jpg"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(row.path, target)
    shutil.copytree(demo_root / "eval" / "images", tmp_path / "folder" / "test")
    result = pstage.train(data=tmp_path / "folder", runs=tmp_path / "runs", name="folder", overrides=FAST)
    assert result.cv["per_task"] == {} and len(json.loads((result.path / "run.json").read_text())["classes"]) == 3
    submission = pd.read_csv(result.path / "submission.csv")
    assert list(submission.columns) == ["image_id", "label"]
    assert set(submission["label"]) <= {"wear", "incorrect", "none"}


def test_failed_start_resumes_after_the_data_is_fixed(demo_copy, tmp_path):
    info_csv = demo_copy / "eval" / "info.csv"
    saved = info_csv.read_bytes()
    info_csv.unlink()
    with pytest.raises(DataError, match="info.csv not found"):
        pstage.train(data=demo_copy, runs=tmp_path, name="fix", overrides=[*FAST, "train.folds=[0]"])
    assert json.loads((tmp_path / "fix" / "run.json").read_text())["status"] == "failed"
    info_csv.write_bytes(saved)
    result = pstage.train(data=demo_copy, runs=tmp_path, name="fix", overrides=[*FAST, "train.folds=[0]"])
    info = json.loads((tmp_path / "fix" / "run.json").read_text())
    assert result.status == "done" and info["status"] == "done" and "error" not in info


def test_a_done_run_stays_done_when_a_rerun_fails(demo_copy, tmp_path):
    first = pstage.train(data=demo_copy, runs=tmp_path, name="keep", overrides=[*FAST, "train.folds=[0]"])
    before = (first.path / "run.json").read_text()
    (demo_copy / "eval" / "info.csv").unlink()  # e.g. the data moved or changed
    with pytest.raises(DataError):
        pstage.train(data=demo_copy, runs=tmp_path, name="keep", overrides=FAST)  # asks for more folds
    assert (first.path / "run.json").read_text() == before


def test_same_seed_same_run(demo_root, tmp_path):
    """Augmented training is reproducible: albumentations' own RNG is seeded per fold and per worker."""
    overrides = [
        *FAST,
        "split.folds=2",
        "train.folds=[0]",
        "train.num_workers=1",
        "augment.preset=strong",
        "augment.device=false",
    ]
    a = pstage.train(data=demo_root, runs=tmp_path, name="a", overrides=overrides)
    b = pstage.train(data=demo_root, runs=tmp_path, name="b", overrides=overrides)
    assert (a.path / "oof.csv").read_text() == (b.path / "oof.csv").read_text()
    c = pstage.train(data=demo_root, runs=tmp_path, name="c", overrides=[*overrides, "seed=7"])
    assert (a.path / "oof.csv").read_text() != (c.path / "oof.csv").read_text()
