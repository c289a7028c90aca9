import numpy as np
import pytest
import torch

from pstage.config import AugmentConfig
from pstage.core.errors import ConfigError
from pstage.data.augment import build_transforms, mix_batch


def test_presets():
    assert build_transforms(AugmentConfig(preset="none")) is None
    basic = build_transforms(AugmentConfig(preset="basic", device=False))
    strong = build_transforms(AugmentConfig(preset="strong", device=False))
    assert len(strong.transforms) > len(basic.transforms) > 0
    image = np.random.default_rng(0).integers(0, 255, (32, 24, 3), dtype=np.uint8)
    out = strong(image=image)["image"]
    assert out.shape == image.shape and out.dtype == np.uint8


def test_user_transforms_replace_the_preset():
    transforms = build_transforms(AugmentConfig(transforms=[{"HorizontalFlip": {"p": 1.0}}, "ToGray"]))
    assert [type(t).__name__ for t in transforms.transforms] == ["HorizontalFlip", "ToGray"]
    transforms = build_transforms(AugmentConfig(transforms=[{"HorizontalFlip": {"p": 1.0}}]))
    image = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    assert (transforms(image=image)["image"] == image[:, ::-1]).all()


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            {"HorizontalFlp": {}},
            "augment.transforms[0]: unknown albumentations transform 'HorizontalFlp'; did you mean HorizontalFlip?",
        ),
        ({"Affine": {"scal": 1.1}}, "augment.transforms[0]: Affine has no parameter 'scal'"),
        ({"HorizontalFlip": {}, "VerticalFlip": {}}, "expected one {TransformName: {params}} mapping"),
    ],
)
def test_bad_transform_specs(spec, message):
    with pytest.raises(ConfigError) as info:
        build_transforms(AugmentConfig(transforms=[spec]))
    assert message in str(info.value)


def _batch(n=8, h=4, w=6):
    """Image i is filled with the value i and is the only image of class i."""
    images = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 3, h, w).clone()
    targets = torch.nn.functional.one_hot(torch.arange(n), n).float()
    return images, targets


def test_vertical_cutmix_swaps_one_half():
    images, targets = _batch()
    cfg = AugmentConfig(cutmix={"p": 1.0, "mode": "vertical"})
    mixed, soft = mix_batch(images, targets, cfg, np.random.default_rng(0))
    left, right = mixed[..., :3], mixed[..., 3:]
    swapped_left = bool((left[0] != 0).all())
    for i in range(len(images)):
        own, other = (right[i], left[i]) if swapped_left else (left[i], right[i])
        assert (own == i).all()  # one half is the image's own, whole
        partner = int(other[0, 0, 0])
        assert (other == partner).all()  # the other half is one other image's, whole
        expected = torch.zeros(len(images))
        expected[i] += 0.5
        expected[partner] += 0.5
        assert torch.allclose(soft[i], expected)


def test_random_cutmix_and_mixup_weights_follow_pixels():
    images, targets = _batch(16, 20, 20)
    mixed, soft = mix_batch(
        images, targets, AugmentConfig(cutmix={"p": 1.0, "mode": "random"}), np.random.default_rng(3)
    )
    own = torch.stack([(mixed[i] == i).float().mean() for i in range(16)])
    assert (own < 1).any()
    assert torch.allclose(own, soft.diagonal(), atol=1e-5)
    mixed, soft = mix_batch(images, targets, AugmentConfig(mixup={"p": 1.0}), np.random.default_rng(1))
    assert torch.allclose(soft.sum(1), torch.ones(16))
    assert not torch.equal(mixed, images)


def test_probability_zero_leaves_the_batch_alone():
    images, targets = _batch()
    mixed, soft = mix_batch(images, targets, AugmentConfig(), np.random.default_rng(0))
    assert mixed is images and soft is targets
