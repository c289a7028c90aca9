"""The augmentation presets, described once: each op with its probability and ranges.

Two backends read this description: ``augment.py`` builds the albumentations pipeline (per image in
the loader) and ``device_augment.py`` its batched draws (on the training device); which one runs
is ``augment.device`` (see ``augment.on_device``), recorded in run.json's ``resolved.augment``.
The semantics are albumentations' (the loader path is what the defaults were measured with): the
device path reproduces each op's draws and its effect, and tests/test_augment_parity.py checks
that, op by op, the two give statistically the same output on the same image.

The ops run in this order, each on the whole image, with the probability ``p`` per image. An op
with ``p=0`` is left out (of the albumentations pipeline too).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

Range = tuple[float, float]


@dataclass(frozen=True)
class Flip:
    """Horizontal mirror."""

    p: float = 0.0


@dataclass(frozen=True)
class Affine:
    """Scale (x and y drawn independently), shift and rotate about the image centre, bilinear, with
    the borders reflected without repeating the edge pixel (OpenCV's BORDER_REFLECT_101)."""

    p: float = 0.0
    scale: Range = (0.9, 1.1)
    translate: Range = (-0.06, 0.06)  # fraction of the width (height), truncated to whole pixels
    rotate: Range = (-10.0, 10.0)  # degrees


@dataclass(frozen=True)
class BrightnessContrast:
    """``x * (1 + c) + 255 * b`` with ``c`` from ``contrast``, ``b`` from ``brightness``, clipped."""

    p: float = 0.0
    brightness: Range = (-0.2, 0.2)
    contrast: Range = (-0.2, 0.2)


@dataclass(frozen=True)
class HueSaturationValue:
    """Shifts in OpenCV's 8-bit HSV: hue in its 0-180 units (2 degrees each, wrapping), saturation
    and value in 0-255 units, added and clipped; grey pixels (saturation 0) stay grey."""

    p: float = 0.0
    hue: Range = (-8.0, 8.0)
    saturation: Range = (-20.0, 20.0)
    value: Range = (-10.0, 10.0)


@dataclass(frozen=True)
class BlurOrNoise:
    """One of three, equally likely: a Gaussian blur (kernel size drawn from ``kernel``, odd, sigma
    from ``sigma``), a motion blur (a line of kernel size drawn from ``kernel``, at any angle, biased
    to one side and shifted off-centre at random: albumentations' MotionBlur defaults), or Gaussian
    noise per pixel and channel (std from ``noise_std``, a fraction of 255)."""

    p: float = 0.0
    kernel: tuple[int, int] = (3, 5)
    sigma: Range = (0.5, 3.0)
    noise_std: Range = (0.02, 0.08)


@dataclass(frozen=True)
class Gray:
    """Luma (0.299 R + 0.587 G + 0.114 B) in all three channels."""

    p: float = 0.0


@dataclass(frozen=True)
class Erase:
    """A number of boxes drawn from ``holes``, each of a height (width) drawn as a fraction of the
    image's from ``height`` (``width``), truncated to whole pixels, placed anywhere inside the
    image (they may overlap), filled with ``fill`` (0-255, every channel)."""

    p: float = 0.0
    holes: tuple[int, int] = (1, 3)
    height: Range = (0.05, 0.15)
    width: Range = (0.05, 0.15)
    fill: float = 0.0


@dataclass(frozen=True)
class Preset:
    """The ops of one preset, in the order they run."""

    flip: Flip = Flip()
    affine: Affine = Affine()
    brightness_contrast: BrightnessContrast = BrightnessContrast()
    hsv: HueSaturationValue = HueSaturationValue()
    blur_noise: BlurOrNoise = BlurOrNoise()
    gray: Gray = Gray()
    erase: Erase = Erase()

    def only(self, op: str) -> Preset:
        """This preset with ``op`` always applied and every other op off (its ranges kept)."""
        if op not in OPS:
            raise KeyError(f"unknown op {op!r}; ops: {', '.join(OPS)}")
        return Preset(**{name: replace(getattr(self, name), p=1.0 if name == op else 0.0) for name in OPS})


OPS = tuple(f.name for f in fields(Preset))
BASIC = Preset(flip=Flip(0.5), affine=Affine(0.7), brightness_contrast=BrightnessContrast(0.5))
STRONG = replace(
    BASIC,
    hsv=HueSaturationValue(0.4),
    blur_noise=BlurOrNoise(0.3),
    gray=Gray(0.05),
    erase=Erase(0.3),
)
PRESETS = {"none": Preset(), "basic": BASIC, "strong": STRONG}
