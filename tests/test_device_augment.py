"""Augmentation on the device (batched after the transfer) and train.batch_size=auto."""

import json
from dataclasses import replace

import pytest
import torch

import pstage
from pstage.config import AugmentConfig, load_config
from pstage.core.errors import ConfigError
from pstage.data.augment import augment_backend, build_transforms, on_device
from pstage.data.device_augment import DeviceAugment, build_device_augment
from pstage.data.presets import OPS, STRONG, Preset
from pstage.training.batch_size import auto_batch_size, scaled_lr
from tests.conftest import FAST

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1) * 255
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) * 255


def _batch(n: int = 16) -> torch.Tensor:
    """uint8 NHWC images, as the loader hands them over."""
    torch.manual_seed(1)
    return torch.randint(0, 256, (n, 32, 24, 3), dtype=torch.uint8)


def _normalised(images: torch.Tensor) -> torch.Tensor:
    return (images.permute(0, 3, 1, 2).float() - MEAN) / STD


@pytest.mark.parametrize("preset", ["basic", "strong"])
def test_presets_on_the_device_draw_per_image_and_repeat_with_the_seed(preset):
    aug = build_device_augment(AugmentConfig(preset=preset, device=True))
    images = _batch()
    torch.manual_seed(0)
    a = aug(images, MEAN, STD)
    torch.manual_seed(0)
    b = aug(images, MEAN, STD)
    assert torch.equal(a, b)  # the same seed draws the same augmentation
    x = _normalised(images)
    assert a.shape == x.shape and a.dtype == torch.float32
    black, white = (-MEAN / STD).flatten(), ((255 - MEAN) / STD).flatten()
    for c in range(3):  # clamped to the valid range, in normalised units
        assert black[c] - 1e-5 <= a[:, c].min() and a[:, c].max() <= white[c] + 1e-5
    same = [torch.allclose(a[i], x[i], atol=1e-4) for i in range(len(x))]
    assert not all(same)  # images are augmented ...
    deltas = {round(float((a[i] - x[i]).abs().mean()), 4) for i in range(len(x)) if not same[i]}
    assert len(deltas) > 1  # ... each with its own parameters, not one draw for the batch


def _only(**probabilities: float) -> DeviceAugment:
    """The strong preset with just the given ops at the given probabilities (every other op off)."""
    return DeviceAugment(Preset(**{op: replace(getattr(STRONG, op), p=probabilities.get(op, 0.0)) for op in OPS}))


def test_the_batched_ops_do_what_they_say():
    images = _batch(8)
    # nothing drawn: exactly the classifier's normalisation (the warp samples pixel centres)
    assert torch.allclose(_only()(images, MEAN, STD), _normalised(images), atol=1e-4)
    # flip: the mirror image
    assert torch.allclose(_only(flip=1.0)(images, MEAN, STD), _normalised(images.flip(2)), atol=1e-4)
    # grey: R = G = B per pixel (luma), back in 0-255 units
    grey = _only(gray=1.0)(images, MEAN, STD) * STD + MEAN
    assert torch.allclose(grey[:, 0], grey[:, 1], atol=1e-2) and torch.allclose(grey[:, 1], grey[:, 2], atol=1e-2)
    luma = (images.float() @ torch.tensor([0.299, 0.587, 0.114])).clamp(0, 255)
    assert torch.allclose(grey[:, 0], luma, atol=0.05)
    # erasing: 1-3 black boxes per image, a few % of its area
    erased = _only(erase=1.0)(images, MEAN, STD) * STD + MEAN
    black = (erased.abs() < 1e-3).all(1).flatten(1).float().mean(1)
    assert bool(((0.001 < black) & (black < 0.05)).all())
    # blur/noise: every image changes, the mean colour stays
    out = _only(blur_noise=1.0)(images, MEAN, STD)
    assert not any(torch.allclose(out[i], _normalised(images)[i], atol=1e-3) for i in range(8))
    assert torch.allclose(out.mean((2, 3)), _normalised(images).mean((2, 3)), atol=0.1)


def test_where_the_preset_runs():
    assert on_device(AugmentConfig(device=True)) and not on_device(AugmentConfig(device=False))
    # auto: batched with CUDA; on a CPU only for small images (measured: benchmarks/throughput.py)
    cuda = torch.cuda.is_available()
    assert on_device(AugmentConfig(), (64, 48)) is True
    assert on_device(AugmentConfig(), (128, 128)) is cuda
    assert on_device(AugmentConfig()) is cuda  # size unknown counts as large
    assert on_device(AugmentConfig(transforms=["HorizontalFlip"]), (64, 48)) is False  # custom pipelines stay per image
    assert build_transforms(AugmentConfig(device=True)) is None  # the loader then only slices the cache
    assert build_transforms(AugmentConfig(), image_size=(64, 48)) is None
    assert build_transforms(AugmentConfig(device=False), image_size=(64, 48)) is not None  # albumentations per image
    assert build_device_augment(AugmentConfig(device=True, preset="none")) is None
    with pytest.raises(ConfigError, match="augment.transforms"):
        on_device(AugmentConfig(device=True, transforms=["HorizontalFlip"]))
    # what run.json records (resolved.augment)
    device = "cuda" if cuda else "cpu"
    assert augment_backend(AugmentConfig(), (64, 48), "auto") == {
        "preset": "strong",
        "backend": "device",
        "device": device,
    }
    assert augment_backend(AugmentConfig(device=False), (64, 48), "cpu")["backend"] == "loader"
    assert augment_backend(AugmentConfig(preset="none"), (64, 48), "cpu")["backend"] == "none"
    assert augment_backend(AugmentConfig(transforms=["ToGray"]), (64, 48), "cpu") == {
        "preset": "custom",
        "backend": "loader",
        "device": "cpu",
    }


def test_device_augmented_training_is_reproducible(demo_root, tmp_path):
    overrides = [*FAST, "split.folds=2", "train.folds=[0]", "augment.device=true", "augment.preset=strong"]
    a = pstage.train(data=demo_root, runs=tmp_path, name="a", overrides=overrides)
    b = pstage.train(data=demo_root, runs=tmp_path, name="b", overrides=overrides)
    assert (a.path / "oof.csv").read_text() == (b.path / "oof.csv").read_text()
    resolved = json.loads((a.path / "run.json").read_text())["resolved"]
    assert resolved["num_workers"] == 0  # nothing left to the loader
    device = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolved["augment"] == {"preset": "strong", "backend": "device", "device": device}  # which backend ran


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
