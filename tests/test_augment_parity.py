"""The two backends of the augmentation presets agree: each op alone (p=1, every other op off), on
the same image drawn many times, gives statistically the same output from albumentations (the
loader) and from the batched device path: per-channel means, contrast, colourfulness, value,
saturation of pale colours, position, spread and tilt of a bright bar, sharpness, erased and grey
pixels."""

from __future__ import annotations

from dataclasses import replace

import albumentations as A
import numpy as np
import pytest
import torch
from scipy.stats import ks_2samp

from pstage.data.augment import albumentations_ops
from pstage.data.device_augment import DeviceAugment
from pstage.data.presets import OPS, STRONG, Erase, HueSaturationValue, Preset

DRAWS = 200
H, W = 48, 40
# differences below these are rounding (albumentations works in uint8 between ops), not behaviour
TOLERANCE = {
    "mean_r": 0.5,
    "mean_g": 0.5,
    "mean_b": 0.5,
    "contrast": 0.5,
    "chroma": 0.5,
    "value": 0.5,
    "pale": 0.01,
    "centre_x": 0.1,
    "centre_y": 0.1,
    "spread_x": 0.1,
    "spread_y": 0.1,
    "tilt": 0.05,
    "sharpness": 0.5,
    "erased": 0.002,
    "grey": 0.01,
}


def scene() -> np.ndarray:
    """A test image with what each op changes: colour gradients, a saturated and a pale region, a grey
    patch (saturation 0), an off-centre tilted bright bar (position, scale, rotation, mirror), edges
    (blur) and no black pixels (erasing)."""
    y, x = np.mgrid[0:H, 0:W] / np.array([H - 1, W - 1])[:, None, None]
    image = np.stack([40 + 150 * x, 60 + 120 * y, 170 - 100 * x * y], -1)
    image[6:18, 24:36] = (120, 120, 120)  # grey: HSV saturation shifts must leave it grey
    image[24:46, 20:38] = (210, 195, 185)  # pale (saturation 0.12): a shift moves it more than a scaling
    image[30:42, 4:16] = (200, 40, 60)  # saturated red
    bar = np.abs((x * W - 12) * 0.9 - (y * H - 14) * 0.45) < 2.5
    image[bar & (y * H < 28)] = (245, 235, 150)  # bright, tilted, off-centre
    return np.clip(image, 10, 250).astype(np.uint8)


def statistics(images: np.ndarray) -> dict[str, np.ndarray]:
    """Per image (N, H, W, 3 in 0-255) the statistics compared between the backends."""
    x = images.astype(np.float64)
    luma = x @ np.array([0.299, 0.587, 0.114])
    weight = np.clip(luma - 160, 0, None)  # the bright bar
    weight = weight / np.maximum(weight.sum((1, 2), keepdims=True), 1e-9)
    ys, xs = np.mgrid[0:H, 0:W]
    cx, cy = (weight * xs).sum((1, 2)), (weight * ys).sum((1, 2))
    dx, dy = xs - cx[:, None, None], ys - cy[:, None, None]
    value = x.max(-1)
    chroma = value - x.min(-1)
    saturation = chroma / np.maximum(value, 1e-9)
    coloured = np.where(saturation > 0.02, saturation, 1.0)  # grey pixels out of the low quantile
    return {
        "mean_r": x[..., 0].mean((1, 2)),
        "mean_g": x[..., 1].mean((1, 2)),
        "mean_b": x[..., 2].mean((1, 2)),
        "contrast": luma.std((1, 2)),
        "chroma": chroma.mean((1, 2)),
        "value": value.mean((1, 2)),  # HSV value: hue and saturation shifts keep it
        "pale": np.quantile(coloured.reshape(len(x), -1), 0.1, axis=1),  # the palest colours' saturation
        "centre_x": cx,
        "centre_y": cy,
        "spread_x": np.sqrt((weight * dx**2).sum((1, 2))),
        "spread_y": np.sqrt((weight * dy**2).sum((1, 2))),
        "tilt": (weight * dx * dy).sum((1, 2)) / np.maximum((weight * dx**2).sum((1, 2)), 1e-9),
        "sharpness": np.sqrt((np.diff(x, axis=1) ** 2).mean((1, 2, 3)) + (np.diff(x, axis=2) ** 2).mean((1, 2, 3))),
        "erased": (x.max(-1) <= 2).mean((1, 2)),
        "grey": (chroma < 3).mean((1, 2)),
    }


def loader_draws(preset: Preset, image: np.ndarray, seed: int = 0) -> np.ndarray:
    """The albumentations pipeline of the preset applied DRAWS times (its own draws each time)."""
    pipeline = A.Compose(albumentations_ops(preset), seed=seed)
    return np.stack([pipeline(image=image)["image"] for _ in range(DRAWS)])


def device_draws(augment: torch.nn.Module, image: np.ndarray, seed: int = 0) -> np.ndarray:
    """The batched path on DRAWS copies of the image (each its own draw), back in 0-255 uint8 HWC."""
    torch.manual_seed(seed)
    batch = torch.from_numpy(image).expand(DRAWS, *image.shape).contiguous()
    zero, one = torch.zeros(1, 3, 1, 1), torch.ones(1, 3, 1, 1)  # mean 0, std 1: output in 0-255 units
    out = augment(batch, zero, one).permute(0, 2, 3, 1).numpy()
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def differences(loader: np.ndarray, device: np.ndarray) -> dict[str, str]:
    """The statistics whose distributions differ: a two-sample KS test rejects at 0.1% and the
    quantiles differ by more than rounding."""
    found = {}
    a, b = statistics(loader), statistics(device)
    for name, tolerance in TOLERANCE.items():
        p = ks_2samp(a[name], b[name], method="asymp").pvalue
        qa, qb = (np.quantile(v, [0.1, 0.25, 0.5, 0.75, 0.9]) for v in (a[name], b[name]))
        gap = float(np.abs(qa - qb).max())
        if p < 1e-3 and gap > tolerance:
            found[name] = f"KS p={p:.1e}, quantiles {np.round(qa, 3).tolist()} vs {np.round(qb, 3).tolist()}"
    return found


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return scene()


@pytest.mark.parametrize("op", OPS)
def test_each_op_acts_alike_on_both_backends(op, image):
    preset = STRONG.only(op)
    loader = loader_draws(preset, image)
    device = device_draws(DeviceAugment(preset), image)
    assert not (loader == image).all((1, 2, 3)).all()  # the op does something ...
    assert differences(loader, device) == {}  # ... and the same thing on both backends


@pytest.mark.parametrize(
    ("op", "other", "caught"),
    [
        ("erase", Erase(p=1.0, holes=(1, 1)), "erased"),  # one box where albumentations draws 1-3
        ("hsv", HueSaturationValue(p=1.0, saturation=(-8.0, 8.0)), "pale"),  # a smaller saturation shift
        ("hsv", HueSaturationValue(p=1.0, value=(0.0, 0.0)), "value"),  # no value shift
    ],
)
def test_the_comparison_catches_a_difference(op, other, caught, image):
    alone = STRONG.only(op)
    device = device_draws(DeviceAugment(replace(alone, **{op: other})), image)
    assert caught in differences(loader_draws(alone, image), device)


def test_the_hand_written_ops_are_albumentations_own():
    """Beyond statistics: the device path's blur kernels are albumentations' kernels for the same
    draws, and its HSV shift is OpenCV's up to OpenCV's 8-bit HSV (hue in 2-degree steps)."""
    from albumentations.augmentations.blur.functional import create_gaussian_kernel_1d, create_motion_kernel
    from albumentations.augmentations.pixel.functional import shift_hsv

    from pstage.data.device_augment import _HEXCONE, _gaussian_kernels, _hsv_rows, _motion_kernels

    class Shifts:  # create_motion_kernel draws its two shifts with random_state.uniform(-1, 1)
        def __init__(self, *values: float):
            self.values = list(values)

        def uniform(self, low: float, high: float) -> float:
            return low + (high - low) * self.values.pop(0)

    blur = STRONG.blur_noise
    u = np.random.default_rng(0).random((200, 9))  # columns as the device path reads them
    gaussian, motion = _gaussian_kernels(u, blur, 5), _motion_kernels(u, blur, 5)
    for i, row in enumerate(u):
        size = 3 + min(int(row[2] * 3), 2)  # randint(3, 5); 4 becomes 5
        size += size % 2 == 0
        g = create_gaussian_kernel_1d(0.5 + 2.5 * row[3], size)
        assert np.allclose(np.pad(np.outer(g, g), (5 - size) // 2), gaussian[i])
        size = 3 + 2 * min(int(row[2] * 2), 1)  # an odd size in 3..5
        line = create_motion_kernel(size, 360 * row[4], 2 * row[5] - 1, True, Shifts(row[6], row[7]))
        assert np.allclose(np.pad(line / line.sum(), (5 - size) // 2), motion[i])

    image = np.random.default_rng(1).integers(0, 256, (32, 24, 3), dtype=np.uint8)
    image[:4] = 128  # grey rows stay grey
    hexcone = torch.tensor(_HEXCONE).view(3, 1, 3, 1, 1)
    for hue, sat, val in [(8, 20, 10), (-8, -20, -10), (-3, 13, 7)]:
        expected = shift_hsv(image, hue, sat, val).astype(np.float64)
        params = torch.tensor([[1.0, 0.0, hue / 30, sat / 255, val / 255]])
        x = torch.from_numpy(image).permute(2, 0, 1)[None].float()
        out = _hsv_rows(x, params, hexcone)[0].permute(1, 2, 0).numpy()
        assert np.abs(out - expected).mean() < 1.0 and np.abs(out - expected).max() < 6.0
        assert np.allclose(out[:4], expected[:4], atol=0.5)
