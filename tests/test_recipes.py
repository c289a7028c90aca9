"""Recipes as switches: borderline ages, age regression/ordinal heads, ArcFace, pseudo-labels, final fit.

Each test checks what training saw (the rows of a training fold, the extras of its batches, the
heads' outputs), not the F1 a tiny model reaches.
"""

from __future__ import annotations

import json
from pathlib import Path

import pstage.core.compat  # noqa: F401  (before lightning, which imports torchvision)

import numpy as np
import pandas as pd
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from pstage.config import load_config
from pstage.core.errors import ConfigError
from pstage.core.tasks import label_task, mask_task

# test-sized: 2 folds, fold 0 only, 1 epoch of timm's tiny test_resnet on 32x24 inputs
TINY = [
    "data.image_size=[32,24]",
    "model.name=test_resnet",
    "split.folds=2",
    "train.folds=[0]",
    "train.epochs=1",
    "train.batch_size=32",
    "optim.lr=0.01",
    "train.progress=none",
    "log.loggers=[]",
]


def _cfg(*overrides: str):
    return load_config(None, ["model.name=test_resnet", "data.image_size=[32,24]", *overrides])


# --- borderline ages -----------------------------------------------------------------------------


def test_borderline_band_sits_below_each_threshold() -> None:
    from pstage.training.recipes import borderline_mask

    ages = np.arange(20, 70)
    both = borderline_mask(ages, _cfg("data.borderline.years=3"))
    assert set(ages[both]) == {27, 28, 29, 57, 58, 59}
    old_only = borderline_mask(ages, _cfg("data.borderline.years=2", "data.borderline.thresholds=[60]"))
    assert set(ages[old_only]) == {58, 59}
    assert not borderline_mask(ages, _cfg()).any()  # default: off


def test_recipes_refuse_data_without_ages() -> None:
    from pstage.data.sources import Source
    from pstage.training.recipes import check_recipes

    frame = pd.DataFrame({"image_id": ["a", "b"], "path": ["a", "b"], "group": ["a", "b"], "target": [0, 1]})
    source = Source("folder", Path("."), label_task(["cat", "dog"]), frame, None)
    with pytest.raises(ConfigError, match=r"data.borderline.years=3 needs numeric ages"):
        check_recipes(_cfg("data.borderline.years=3"), source)
    with pytest.raises(ConfigError, match=r"model.age_head=regress needs numeric ages"):
        check_recipes(_cfg("model.head=multi", "model.age_head=regress"), source)
    with pytest.raises(ConfigError, match=r"train.final_fit=alone: this data has no test images"):
        check_recipes(_cfg("train.final_fit=alone"), source)
    with pytest.raises(ConfigError, match=r"model.age_head=ordinal needs model.head=multi"):
        _cfg("model.age_head=ordinal")


def test_age_recipes_on_data_without_ages_stop_before_the_run_folder(tmp_path: Path) -> None:
    from pstage.training.train import train

    labels = tmp_path / "labels.csv"
    labels.write_text("path,label\na.jpg,cat\n")
    with pytest.raises(ConfigError, match=r"^data.borderline.years=3 needs numeric ages .*this csv data has none"):
        train(None, data=labels, runs=tmp_path / "runs", name="x", overrides=["data.borderline.years=3"])
    assert not (tmp_path / "runs" / "x").exists()


def test_sample_weights_scale_each_images_share() -> None:
    from pstage.models.losses import compute_loss

    torch.manual_seed(0)
    logits, targets = torch.randn(5, 4), torch.eye(4)[[0, 1, 2, 3, 0]]
    for name in ("ce", "focal", "f1"):
        plain = compute_loss(name, logits, targets)
        assert compute_loss(name, logits, targets, sample_weight=torch.ones(5)) == pytest.approx(float(plain), rel=1e-5)
        zero_last = compute_loss(name, logits, targets, sample_weight=torch.tensor([1.0, 1, 1, 1, 0]))
        assert zero_last == pytest.approx(float(compute_loss(name, logits[:4], targets[:4])), rel=1e-5)


# --- age heads and ArcFace ------------------------------------------------------------------------


def test_regression_head_gives_bucket_probabilities_around_the_age() -> None:
    from pstage.models.classifier import AgeRegressionHead, class_probs, create_classifier

    head = AgeRegressionHead(8, (30, 60))
    head.set_stats(torch.tensor([20.0, 40.0, 60.0]))
    ages = torch.tensor([5.0, 29.0, 31.0, 45.0, 59.0, 61.0, 90.0])
    probs = head.readout(head.standardise(ages)[:, None]).exp()
    assert torch.allclose(probs.sum(1), torch.ones(len(ages)), atol=1e-5)
    assert probs.argmax(1).tolist() == [0, 0, 1, 1, 1, 2, 2]
    assert probs[0, 0] > 0.99 and probs[-1, 2] > 0.99
    assert torch.allclose(head.years(head.standardise(ages)[:, None]), ages)

    task = mask_task()
    model = create_classifier("test_resnet", task, "multi", age_head="regress", input_size=(32, 24)).eval()
    images = torch.randint(0, 255, (3, 32, 24, 3), dtype=torch.uint8)
    assert model(images, raw=True)["age"].shape == (3, 1)  # the age in (standardised) years
    logits = model(images)
    assert logits["age"].shape == (3, 3)
    assert torch.allclose(logits["age"].exp().sum(1), torch.ones(3), atol=1e-5)  # log-probabilities
    assert torch.allclose(class_probs(logits, task).sum(1), torch.ones(3), atol=1e-5)


def test_ordinal_head_is_rank_consistent() -> None:
    from pstage.models.classifier import OrdinalHead
    from pstage.models.losses import ordinal_loss

    torch.manual_seed(0)
    head = OrdinalHead(8, 3)
    with torch.no_grad():
        head.gaps.fill_(-5.0)  # nearly equal biases: still never a negative probability
    features = torch.randn(64, 8) * 10
    cumulative = head(features)
    assert cumulative.shape == (64, 2) and (cumulative[:, 0] >= cumulative[:, 1]).all()
    probs = head.readout(cumulative).exp()
    assert (probs >= 0).all() and torch.allclose(probs.sum(1), torch.ones(64), atol=1e-4)
    # CORAL targets: an image of bucket 2 is "above 0" and "above 1"
    confident = torch.tensor([[20.0, 20.0]])
    assert ordinal_loss(confident, torch.tensor([[0.0, 0.0, 1.0]])) < 1e-6
    assert ordinal_loss(confident, torch.tensor([[1.0, 0.0, 0.0]])) > 10


def test_arcface_margin_only_in_training_logits() -> None:
    from pstage.models.classifier import ArcFaceHead, class_probs, create_classifier, head_task

    head = ArcFaceHead(8, 4, scale=10.0, margin=0.5)
    cosine = head(torch.randn(6, 8))
    assert cosine.abs().max() <= 1 + 1e-6
    targets = torch.eye(4)[[0, 1, 2, 3, 0, 1]]
    train = head.margin_logits(cosine, targets)
    plain = head.readout(cosine)
    assert torch.allclose(train[targets == 0], plain[targets == 0])  # other classes: plain s*cos
    assert (train[targets == 1] < plain[targets == 1]).all()  # the target class is penalised
    theta = torch.acos(cosine[targets == 1].clamp(-1, 1))
    inside = theta + 0.5 < torch.pi
    assert torch.allclose(train[targets == 1][inside], 10 * torch.cos(theta + 0.5)[inside], atol=1e-4)
    assert torch.allclose(ArcFaceHead(8, 4, 10.0, 0.0).margin_logits(cosine, targets), plain, atol=1e-5)

    task = mask_task()
    model = create_classifier("test_resnet", task, "linear", classifier="arcface", input_size=(32, 24)).eval()
    probs = class_probs(model(torch.zeros(2, 32, 24, 3, dtype=torch.uint8)), head_task(task, "linear"))
    assert probs.shape == (2, 18) and torch.allclose(probs.sum(1), torch.ones(2), atol=1e-5)


def test_training_step_reads_ages_and_weights() -> None:
    """The regression head trains on the batch's ages; weight 0 removes an image from the loss."""
    from pstage.models.module import ClassifierModule

    cfg = _cfg("model.head=multi", "model.age_head=regress", "augment.preset=none")
    torch.manual_seed(0)
    module = ClassifierModule(cfg.to_dict(), mask_task().to_dict()).train()
    module.log = lambda *a, **k: None
    images = torch.randint(0, 256, (4, 32, 24, 3), dtype=torch.uint8)
    targets = torch.tensor([0, 4, 8, 1])
    ages = torch.tensor([20.0, 45.0, 70.0, 40.0])

    def loss(ages: torch.Tensor, weight: torch.Tensor) -> float:
        return float(module.training_step((images, targets, {"age": ages, "weight": weight}), 0).detach())

    ones = torch.ones(4)
    assert loss(ages, ones) != pytest.approx(loss(ages + 10, ones))  # the ages reach the loss
    # the last image weighted 0: its age no longer matters
    zero = torch.tensor([1.0, 1.0, 1.0, 0.0])
    assert loss(ages, zero) == pytest.approx(loss(torch.tensor([20.0, 45.0, 70.0, 99.0]), zero), rel=1e-6)

    # soft targets (pseudo.soft): one-hot rows are the hard labels, the teacher's probabilities differ
    def soft_loss(soft: torch.Tensor) -> float:
        return float(module.training_step((images, targets, {"age": ages, "soft": soft}), 0).detach())

    one_hot = torch.nn.functional.one_hot(targets, 18).float()
    assert soft_loss(one_hot) == pytest.approx(loss(ages, ones), rel=1e-6)
    assert soft_loss(torch.full((4, 18), 1 / 18)) != pytest.approx(loss(ages, ones))


# --- end to end: what the folds trained and validated on ------------------------------------------


class Capture(Callback):
    """Keeps the fold's datasets as the Trainer saw them."""

    def __init__(self, store: dict, fold: int):
        self.store, self.fold = store, fold

    def on_train_start(self, trainer, pl_module) -> None:
        self.store[self.fold] = (trainer.datamodule.train_set, trainer.datamodule.val_set, pl_module)


def _source(demo_root: Path, cfg):
    from pstage.data.sources import load_source

    return load_source(cfg.data.model_copy(update={"path": str(demo_root)}))


@pytest.fixture(scope="module")
def recipe_runs(demo_root: Path, tmp_path_factory: pytest.TempPathFactory):
    """Run A: borderline drop + age regression + final fit alone. Run B: A's pseudo-labels + borderline
    weight + ordinal age + ArcFace."""
    from pstage.training.train import train

    runs = tmp_path_factory.mktemp("recipe-runs")
    seen_a: dict = {}
    train(
        None,
        data=demo_root,
        runs=runs,
        name="a",
        overrides=[
            *TINY,
            "model.head=multi",
            "model.age_head=regress",
            "data.borderline.years=5",
            "train.final_fit=alone",
        ],
        fold_callbacks=lambda k: [Capture(seen_a, k)],
    )
    seen_b: dict = {}
    train(
        None,
        data=demo_root,
        runs=runs,
        name="b",
        overrides=[
            *TINY,
            "model.head=multi",
            "model.age_head=ordinal",
            "model.classifier=arcface",
            "data.borderline.years=5",
            "data.borderline.mode=weight",
            "data.borderline.weight=0.25",
            "pseudo.run=a",
            "pseudo.threshold=0.01",
        ],
        fold_callbacks=lambda k: [Capture(seen_b, k)],
    )
    return runs, seen_a, seen_b


def test_borderline_images_leave_training_but_stay_in_validation(recipe_runs, demo_root: Path) -> None:
    from pstage.training.recipes import borderline_mask

    runs, seen, _ = recipe_runs
    cfg = load_config(runs / "a" / "config.yaml")
    table = _source(demo_root, cfg).train  # cache rows = table order
    folds = pd.read_csv(runs / "a" / "folds.csv", dtype={"image_id": str}).set_index("image_id")
    band = borderline_mask(table["age"].to_numpy(), cfg)
    fold = folds.loc[table["image_id"], "fold"].to_numpy()
    train_set, val_set, module = seen[0]
    assert band[fold == 1].any() and band[fold == 0].any()  # the demo data has borderline persons on both sides
    assert set(train_set.rows) == set(np.flatnonzero((fold == 1) & ~band))  # no borderline image trained on
    assert set(val_set.rows) == set(np.flatnonzero(fold == 0))  # every validation image kept
    oof = pd.read_csv(runs / "a" / "oof.csv", dtype={"image_id": str})
    assert set(oof["image_id"]) == set(table["image_id"][fold == 0])
    metrics = json.loads((runs / "a" / "fold_0" / "metrics.json").read_text())
    assert metrics["borderline_images"] == int(band[fold == 1].sum())
    # the regression head saw the training fold's ages and standardised with their statistics
    assert np.array_equal(train_set.extras["age"], table["age"].to_numpy()[train_set.rows].astype(np.float32))
    assert float(module.model.heads["age"].mean) == pytest.approx(float(train_set.extras["age"].mean()), rel=1e-5)
    info = json.loads((runs / "a" / "run.json").read_text())
    assert info["status"] == "done" and info["recipes"]["age_head"] == "regress"


def test_final_fit_trains_on_every_person_and_makes_the_submission(recipe_runs, demo_root: Path) -> None:
    from pstage.training.recipes import borderline_mask

    runs, _, _ = recipe_runs
    run = runs / "a"
    cfg = load_config(run / "config.yaml")
    table = _source(demo_root, cfg).train
    final = json.loads((run / "final" / "metrics.json").read_text())
    fold0 = json.loads((run / "fold_0" / "metrics.json").read_text())
    assert final["epochs"] == fold0["best_epoch"] + 1
    assert final["train_images"] == len(table) - int(borderline_mask(table["age"].to_numpy(), cfg).sum())
    # persons.group=auto pools each person's photos in test.csv when that raised the OOF CV (a chance
    # outcome for this tiny model); test_raw.csv then keeps the model's own probabilities
    raw = run / "test_raw.csv"
    test = pd.read_csv(raw if raw.exists() else run / "test.csv")
    assert np.allclose(test.filter(like="p_").to_numpy(), np.load(run / "final" / "test.npy"), atol=1e-5)
    assert not np.allclose(np.load(run / "final" / "test.npy"), np.load(run / "fold_0" / "test.npy"), atol=1e-4)
    assert json.loads((run / "run.json").read_text())["recipes"]["final_fit"]["mode"] == "alone"
    # pstage predict re-creates the same submission (final model included)
    from pstage.inference.predict import predict

    again = predict(run, runs=runs, out=run / "again.csv")
    assert again.frame["ans"].tolist() == pd.read_csv(run / "submission.csv")["ans"].tolist()


def test_pseudo_labels_train_but_never_validate(recipe_runs, demo_root: Path) -> None:
    from pstage.data.datasets import CombinedImages

    runs, _, seen = recipe_runs
    teacher = pd.read_csv(runs / "a" / "test.csv", dtype={"image_id": str})
    train_set, val_set, module = seen[0]
    assert isinstance(train_set, CombinedImages)
    fold_part, pseudo_part = train_set.parts
    assert Path(pseudo_part.cache) != Path(val_set.cache)  # test images come from the test cache only
    assert len(pseudo_part) == len(teacher)  # threshold 0.01: every test image qualifies
    assert np.array_equal(pseudo_part.targets, teacher.filter(like="p_").to_numpy().argmax(1))
    folds = pd.read_csv(runs / "b" / "folds.csv", dtype={"image_id": str})
    oof = pd.read_csv(runs / "b" / "oof.csv", dtype={"image_id": str})
    assert not set(oof["image_id"]) & set(teacher["image_id"])
    assert set(oof["image_id"]) == set(folds["image_id"][folds["fold"] == 0])
    assert len(val_set) == len(oof)
    # borderline weight mode: images kept, weight 0.25 on the band, 1 on pseudo-labelled images
    cfg = load_config(runs / "b" / "config.yaml")
    table = _source(demo_root, cfg).train
    assert set(fold_part.rows) == set(np.flatnonzero(folds.set_index("image_id").loc[table["image_id"], "fold"] == 1))
    from pstage.training.recipes import borderline_mask

    band = borderline_mask(table["age"].to_numpy()[fold_part.rows], cfg)
    assert np.array_equal(fold_part.extras["weight"], np.where(band, 0.25, 1.0).astype(np.float32))
    assert (pseudo_part.extras["weight"] == 1).all()
    batch = train_set.__getitems__(list(range(len(train_set) - 3, len(train_set))) + [0])
    assert batch[0].shape == (4, 32, 24, 3) and batch[2]["weight"].shape == (4,)
    # ordinal age + ArcFace heads, valid probabilities over the 18 classes
    from pstage.models.classifier import ArcFaceHead, OrdinalHead

    heads = module.model.heads
    assert isinstance(heads["age"], OrdinalHead) and isinstance(heads["mask"], ArcFaceHead)
    probs = pd.read_csv(runs / "b" / "test.csv").filter(like="p_").to_numpy()
    assert np.allclose(probs.sum(1), 1, atol=1e-4)
    info = json.loads((runs / "b" / "run.json").read_text())
    assert info["recipes"]["pseudo"]["images"] == len(teacher)
