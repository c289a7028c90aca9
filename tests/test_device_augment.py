"""Augmentation on the device (kornia, batched after the transfer) and train.batch_size=auto."""

import json

import pytest
import torch

import pstage
from pstage.config import AugmentConfig, load_config
from pstage.core.errors import ConfigError
from pstage.data.augment import build_transforms, on_device
from pstage.data.device_augment import build_device_augment
from pstage.training.batch_size import auto_batch_size, scaled_lr
from tests.conftest import FAST


def _batch(n: int = 16) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.rand(n, 3, 32, 24)


@pytest.mark.parametrize("preset", ["basic", "strong"])
def test_presets_on_the_device_draw_per_image_and_repeat_with_the_seed(preset):
    aug = build_device_augment(AugmentConfig(preset=preset, device=True))
    x = _batch()
    torch.manual_seed(0)
    a = aug(x)
    torch.manual_seed(0)
    b = aug(x)
    assert torch.equal(a, b)  # the same seed draws the same augmentation
    assert a.shape == x.shape and 0.0 <= a.min() and a.max() <= 1.0
    changed = (a - x).abs().flatten(1).mean(1) > 1e-4
    assert 0 < int(changed.sum())  # images are augmented ...
    same = [torch.allclose(a[i], x[i]) for i in range(len(x))]
    deltas = {round(float((a[i] - x[i]).abs().mean()), 4) for i in range(len(x)) if not same[i]}
    assert len(deltas) > 1  # ... each with its own parameters, not one draw for the batch


def test_where_the_preset_runs():
    assert on_device(AugmentConfig(device=True)) and not on_device(AugmentConfig(device=False))
    # auto: on with CUDA, on the CPU the loader (measured faster there: benchmarks/throughput.py)
    assert on_device(AugmentConfig()) == torch.cuda.is_available()
    assert on_device(AugmentConfig(transforms=["HorizontalFlip"])) is False  # custom pipelines stay per image
    assert build_transforms(AugmentConfig(device=True)) is None  # the loader then only slices the cache
    assert build_device_augment(AugmentConfig(device=True, preset="none")) is None
    with pytest.raises(ConfigError, match="augment.transforms"):
        on_device(AugmentConfig(device=True, transforms=["HorizontalFlip"]))


def test_device_augmented_training_is_reproducible(demo_root, tmp_path):
    overrides = [*FAST, "split.folds=2", "train.folds=[0]", "augment.device=true", "augment.preset=strong"]
    a = pstage.train(data=demo_root, runs=tmp_path, name="a", overrides=overrides)
    b = pstage.train(data=demo_root, runs=tmp_path, name="b", overrides=overrides)
    assert (a.path / "oof.csv").read_text() == (b.path / "oof.csv").read_text()
    assert json.loads((a.path / "run.json").read_text())["resolved"]["num_workers"] == 0  # nothing left to the loader


def test_lr_scaling_rule():
    assert scaled_lr(1e-3, "adamw", 256) == pytest.approx(2e-3)  # sqrt(256 / 64)
    assert scaled_lr(0.1, "sgd", 256) == pytest.approx(0.4)  # linear
    assert scaled_lr(1e-3, "adamw", 64) == pytest.approx(1e-3)


def test_auto_batch_size_keeps_the_measured_default_on_cpu(demo_root, tmp_path):
    cfg = load_config(overrides=[*FAST, "train.batch_size=auto"])
    assert auto_batch_size(cfg, None, torch.device("cpu"), "32-true", 10_000) == 64
    result = pstage.train(
        data=demo_root,
        runs=tmp_path,
        name="auto",
        overrides=[*FAST, "split.folds=2", "train.folds=[0]", "train.batch_size=auto"],
    )
    info = json.loads((result.path / "run.json").read_text())
    assert info["resolved"]["batch_size"] == 64 and info["resolved"]["lr"] == pytest.approx(cfg.optim.lr)
    assert "batch_size: auto" in (result.path / "config.yaml").read_text()  # the setting, not its resolution


def test_a_bad_batch_size_is_one_line():
    with pytest.raises(ConfigError, match="train.batch_size"):
        load_config(overrides=["train.batch_size=big"])
