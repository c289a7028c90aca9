"""Synthetic, deterministic stand-in for the Boostcamp "mask status" data set, in its exact on-disk layout.

`make_demo_data(root)` draws person-like faces with OpenCV so that a whole training pipeline can be
demonstrated and tested without the real (non-redistributable) photos:

    root/train/train.csv                 id,gender,race,age,path
    root/train/images/<path>/{mask1..mask5,incorrect_mask,normal}.<ext>
    root/eval/info.csv                   ImageID,ans   (ans is 0 everywhere, as in the competition)
    root/eval/images/<ImageID>
    root/demo_truth.csv                  ImageID,ans,mask,gender,age,person   (hidden eval truth; age in years)
    root/demo.json                       manifest (arguments + counts), written last

The cues are learnable but noisy: the mask status is drawn per photo, gender by hair length, lip colour,
eyebrows and beard (with stereotype breakers), age by graded hair greyness, wrinkles, a sagging lower face
and duller skin. Every person gets its own RNG from (seed, person index), so the bytes written do not
depend on the number of worker processes. Only the standard library, numpy, pandas, cv2 and core.tasks'
labels are used (worker processes import nothing else). The drawing is the demo's own: no stage imports it.
"""

from __future__ import annotations

import hashlib
import json
import math
import multiprocessing
import os
import shutil
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist

import cv2
import numpy as np
import pandas as pd

from pstage.core.tasks import GENDERS, MASK_STEMS, age_bucket, mask_label

GENERATOR_VERSION = 1
STEMS = ("mask1", "mask2", "mask3", "mask4", "mask5", "incorrect_mask", "normal")
TRUTH_FILE = "demo_truth.csv"
MANIFEST_FILE = "demo.json"
TRAIN_COLUMNS = ["id", "gender", "race", "age", "path"]
INFO_COLUMNS = ["ImageID", "ans"]
TRUTH_COLUMNS = ["ImageID", "ans", "mask", "gender", "age", "person"]
_OWNED = (MANIFEST_FILE, TRUTH_FILE, "train", "eval")  # removed (manifest first) before regenerating
_IDENTITY, _PHOTOS, _SHUFFLE, _JUNK = 1, 2, 3, 4  # RNG stream tags: streams never collide
_SHIFT = 4  # fixed-point bits for cv2 drawing: sub-pixel accuracy at tiny sizes
_ONE = 1 << _SHIFT
_AA = cv2.LINE_AA
_PNG_PARAMS = [
    cv2.IMWRITE_PNG_COMPRESSION,
    1,
    cv2.IMWRITE_PNG_STRATEGY,
    cv2.IMWRITE_PNG_STRATEGY_HUFFMAN_ONLY,
]  # noisy: fast
_NORMAL_Q = np.array([NormalDist().inv_cdf((k + 0.5) / 256) for k in range(256)], np.float32)

Color = tuple[float, float, float]
_Job = tuple[str, int, int, int, tuple[int, int]]  # (root, seed, person index, train persons, (H, W))
Points = np.ndarray  # (N, 2) float local coordinates: face centre at 0, face half-height 1, y down


# ----------------------------------------------------------------------------------------------- labels


AGE_THRESHOLDS = (30, 60)  # the competition's age buckets: <30, 30-59, >=60 (data.age_thresholds' default)


def truth_class(stem: str, gender: str, age: int) -> int:
    """The competition class of a photo, with core.tasks' labels (mask * 6 + gender * 3 + age bucket)."""
    return int(mask_label(MASK_STEMS[stem], GENDERS[gender], age_bucket(age, AGE_THRESHOLDS)))


# ----------------------------------------------------------------------------------------------- persons


@dataclass(frozen=True)
class Look:
    """Identity of a person, fixed across its 7 photos (colours are BGR)."""

    skin: Color
    hair: Color
    strand: Color
    grey: float
    long_hair: bool
    hair_len: float
    hairline: float
    bangs: bool
    brow: Color
    brow_w: float
    brow_arch: float
    lips: Color
    lip_h: float
    eyeliner: float
    face_w: float
    jaw: float
    sag: float
    beard: int
    beard_col: Color
    cloth: Color
    wrinkles: float
    wrinkle_phase: float
    mask_order: tuple[int, ...]
    mask_cols: tuple[Color, ...]
    pattern: int
    pattern_col: Color


@dataclass(frozen=True)
class Person:
    """One synthetic person: labels, file extension, junk files and look."""

    seed: int
    index: int
    pid: str
    split: str
    gender: str
    age: int
    ext: str
    junk: int
    look: Look

    @property
    def path(self) -> str:
        """Folder name as in the competition: <id>_<gender>_<race>_<age>."""
        return f"{self.pid}_{self.gender}_Asian_{self.age}"


def _rng(seed: int, tag: int, *rest: int) -> np.random.Generator:
    """Independent generator per (seed, stream tag, indices)."""
    return np.random.default_rng([seed, tag, *rest])


def _sample_age(rng: np.random.Generator) -> int:
    """Age like the real data: ~45% 18-29, ~40% 30-59 (many 50-59), ~15% 60+ (spike at 60)."""
    u, r = rng.random(), rng.random()
    if u < 0.45:
        return 18 + int(rng.beta(1.2, 2.0) * 12)
    if u < 0.85:
        return int(rng.integers(30, 50)) if r < 0.45 else int(rng.integers(50, 60))
    return 60 if r < 0.55 else int(rng.integers(61, 66)) if r < 0.9 else int(rng.integers(66, 76))


def _sample_ext(rng: np.random.Generator) -> str:
    """File extension: ~77% .jpg, 10% .jpeg, 10% .png, ~3% upper case."""
    u = rng.random()
    if u < 0.10:
        return ".jpeg"
    if u < 0.20:
        return ".png"
    if u < 0.23:
        return str(rng.choice([".JPG", ".JPEG", ".PNG"]))
    return ".jpg"


def _mix(a: Sequence[float], b: Sequence[float], t: float) -> Color:
    """Linear blend of two colours, t=0 gives a."""
    return tuple(float(x + (y - x) * t) for x, y in zip(a, b, strict=True))  # type: ignore[return-value]


def _shade(c: Sequence[float], k: float) -> Color:
    """Colour scaled by k, clipped to 0..255."""
    return tuple(float(min(255.0, max(0.0, x * k))) for x in c)  # type: ignore[return-value]


def _clip01(x: float) -> float:
    """Clamp to [0, 1]."""
    return float(min(1.0, max(0.0, x)))


def _sample_skin(rng: np.random.Generator, dull: float) -> Color:
    """Skin tone (light to tan), duller and greyer with age."""
    t = rng.beta(2.0, 2.0)
    skin = np.array(_mix((178, 200, 236), (112, 146, 192), t)) + rng.normal(0, 5, 3)
    grey = skin.mean() - 12.0
    return _mix(skin, (grey, grey, grey), dull)


def _sample_hair(rng: np.random.Generator, female: bool, grey: float) -> tuple[Color, Color]:
    """Hair colour (black/brown, greyed with age) and a strand colour for texture / salt-and-pepper."""
    bases = [(22, 22, 28), (28, 38, 58), (40, 62, 98), (60, 95, 140)]
    probs = [0.4, 0.3, 0.2, 0.1] if female else [0.65, 0.28, 0.07, 0.0]
    base = np.array(bases[int(rng.choice(4, p=probs))]) + rng.normal(0, 4, 3)
    white = np.full(3, rng.uniform(165, 215))
    hair = _mix(base, white, 0.85 * grey**1.3)
    strand = _mix(_shade(base, 1.7), white, min(1.0, grey * 1.6))
    return _clip_col(hair), _clip_col(strand)


def _clip_col(c: Sequence[float]) -> Color:
    """Colour clipped to 0..255 as plain floats."""
    return tuple(float(min(255.0, max(0.0, x))) for x in c)  # type: ignore[return-value]


def _sample_mask_cols(rng: np.random.Generator) -> tuple[Color, ...]:
    """Per-person colour of each mask style: white, black, surgical blue, patterned base, KF94."""
    white = _clip_col(np.full(3, 236.0) + rng.normal(0, 6, 3))
    black = _clip_col(np.full(3, rng.uniform(20, 45)) + rng.normal(0, 4, 3))
    surgical = _clip_col(np.array([228.0, 200.0, 150.0]) + rng.normal(0, 10, 3))
    patterned = _clip_col(rng.uniform(40, 220, 3))
    kf94 = [(238, 238, 238), (200, 214, 226), (150, 150, 152), (40, 40, 42)][int(rng.integers(4))]
    return white, black, surgical, patterned, _clip_col(kf94)


def _sample_look(rng: np.random.Generator, female: bool, age: int) -> Look:
    """Identity of a person; gender and age cues are graded and noisy on purpose."""
    apparent = age + rng.normal(0, 5)
    grey = _clip01((apparent - 40) / 28 + rng.normal(0, 0.12))
    if female and age >= 45 and rng.random() < 0.3:
        grey *= 0.25  # dyed hair
    wrinkles = _clip01((age + rng.normal(0, 5) - 32) / 30)
    hair, strand = _sample_hair(rng, female, grey)
    long_hair = rng.random() < (0.87 if female else 0.1)
    bangs = rng.random() < (0.2 if female else 0.08)
    recede = 0.0 if female else 0.16 * _clip01((apparent - 40) / 30) * rng.random()
    red_lips = female and rng.random() < 0.8
    skin = _sample_skin(rng, 0.35 * _clip01((apparent - 25) / 45))
    natural_lips = _mix(skin, (95, 95, 175), 0.45)
    red = _clip_col(np.array([70.0, 55.0, 190.0]) + rng.normal(0, 12, 3))
    beard = 0 if female or rng.random() > 0.3 + 0.2 * (age >= 35) else 1 + int(rng.random() < 0.35)
    return Look(
        skin=skin,
        hair=hair,
        strand=strand,
        grey=grey,
        long_hair=bool(long_hair),
        hair_len=float(rng.uniform(1.3, 2.1) if female else rng.uniform(1.1, 1.5)),
        hairline=float(-0.44 if bangs else -0.68 + rng.normal(0, 0.03) - recede),
        bangs=bool(bangs),
        brow=_mix(_shade(hair, 0.85), hair, 0.5 * grey),
        brow_w=float(rng.normal(0.026, 0.006) if female else rng.normal(0.046, 0.009)),
        brow_arch=float(rng.uniform(0.03, 0.06) if female else rng.uniform(0.0, 0.035)),
        lips=red if red_lips else natural_lips,
        lip_h=float(rng.uniform(0.045, 0.065) if female else rng.uniform(0.03, 0.05)),
        eyeliner=float(0.022 if female and rng.random() < 0.55 else 0.012),
        face_w=float(rng.uniform(0.66, 0.75) if female else rng.uniform(0.7, 0.8)),
        jaw=float(rng.uniform(-0.04, 0.04) + (0.0 if female else 0.03)),
        sag=float(0.14 * _clip01((apparent - 30) / 35)),
        beard=int(beard),
        beard_col=_mix(hair, _shade(hair, 0.8), 0.5),
        cloth=_clip_col(rng.uniform(15, 235, 3)),
        wrinkles=wrinkles,
        wrinkle_phase=float(rng.uniform(0, 2 * math.pi)),
        mask_order=tuple(int(i) for i in rng.permutation(5)),
        mask_cols=_sample_mask_cols(rng),
        pattern=int(rng.integers(3)),
        pattern_col=_clip_col(rng.uniform(20, 235, 3)),
    )


def person_spec(seed: int, index: int, persons: int) -> Person:
    """Labels, extension, junk and look of person `index` (train when index < persons, else eval)."""
    rng = _rng(seed, _IDENTITY, index)
    female = rng.random() < 0.6
    age = _sample_age(rng)
    ext = _sample_ext(rng)
    junk = 0 if rng.random() >= 0.05 else 1 + int(rng.random() < 0.5)
    look = _sample_look(rng, female, age)
    split = "train" if index < persons else "eval"
    gender = "female" if female else "male"
    return Person(seed, index, f"{index + 1:06d}", split, gender, age, ext, junk, look)


# ----------------------------------------------------------------------------------------------- drawing


@dataclass(frozen=True)
class _Frame:
    """Maps local face coordinates to fixed-point pixels (jittered position, scale and rotation)."""

    cx: float
    cy: float
    unit: float
    cos: float
    sin: float

    def px(self, pts: Points) -> np.ndarray:
        """Local (N, 2) points to int32 fixed-point pixel points."""
        p = np.asarray(pts, dtype=np.float64).reshape(-1, 2) * self.unit
        x = self.cx + p[:, 0] * self.cos - p[:, 1] * self.sin
        y = self.cy + p[:, 0] * self.sin + p[:, 1] * self.cos
        return np.round(np.stack([x, y], axis=1) * _ONE).astype(np.int32)

    def thick(self, t: float) -> int:
        """Line thickness in pixels for a local thickness, at least 1."""
        return max(1, int(round(t * self.unit)))


def _frame(rng: np.random.Generator, h: int, w: int) -> _Frame:
    """Per-photo pose: position jitter ~±8%, scale ~±10%, rotation up to ±8 degrees."""
    unit = 0.24 * min(h, w * 4 / 3) * rng.uniform(0.9, 1.1)
    cx = w * (0.5 + rng.uniform(-0.08, 0.08))
    cy = h * (0.47 + rng.uniform(-0.05, 0.05))
    a = math.radians(rng.uniform(-8, 8))
    return _Frame(cx, cy, unit, math.cos(a), math.sin(a))


def _ell(cx: float, cy: float, ax: float, ay: float, a0: float = 0.0, a1: float = 2 * math.pi, n: int = 40) -> Points:
    """Points on an (arc of an) axis-aligned ellipse in local coordinates."""
    t = np.linspace(a0, a1, n)
    return np.stack([cx + ax * np.cos(t), cy + ay * np.sin(t)], axis=1)


def _fill(img: np.ndarray, f: _Frame, pts: Points, col: Color) -> None:
    """Filled anti-aliased polygon."""
    cv2.fillPoly(img, [f.px(pts)], col, _AA, _SHIFT)


def _line(img: np.ndarray, f: _Frame, pts: Points, col: Color, t: float, closed: bool = False) -> None:
    """Anti-aliased polyline of local thickness t."""
    cv2.polylines(img, [f.px(pts)], closed, col, f.thick(t), _AA, _SHIFT)


def _contour(look: Look, thetas: np.ndarray, grow: float = 1.0, drop: float = 0.0) -> Points:
    """Face outline at angles thetas (0 = right, pi/2 = chin); jaw and age sag widen the lower face."""
    s, c = np.sin(thetas), np.cos(thetas)
    low = np.clip(s, 0.0, None)
    x = look.face_w * c * (1.0 + min(0.2, look.jaw + look.sag) * 4.0 * low * (1.0 - low)) * grow
    y = s * np.where(s > 0, 1.0 + 0.3 * look.sag + drop, 1.0)
    return np.stack([x, y], axis=1)


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Colour gradient with soft blobs (drawn small, upscaled) plus a few sharp edges."""
    sh, sw = max(4, h // 8), max(4, w // 8)
    c1, c2 = rng.uniform(25, 235, 3), rng.uniform(25, 235, 3)
    a = rng.uniform(0, 2 * math.pi)
    ys, xs = np.mgrid[0:sh, 0:sw].astype(np.float32)
    t = xs / sw * math.cos(a) + ys / sh * math.sin(a)
    t = (t - t.min()) / max(1e-6, float(t.max() - t.min()))
    small = (c1 + (c2 - c1) * t[..., None]).astype(np.uint8)
    for _ in range(int(rng.integers(2, 6))):
        col = tuple(float(v) for v in rng.uniform(20, 240, 3))
        x, y = int(rng.integers(0, sw)), int(rng.integers(0, sh))
        r = int(rng.integers(1, max(2, sw // 3)))
        if rng.random() < 0.5:
            cv2.circle(small, (x, y), r, col, -1, _AA)
        else:
            cv2.rectangle(small, (x - r, y - r), (x + r, y + 2 * r), col, -1, _AA)
    img = cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)
    for _ in range(int(rng.integers(0, 3))):
        col = tuple(float(v) for v in rng.uniform(20, 240, 3))
        x = int(rng.integers(0, w))
        cv2.line(img, (x, 0), (x + int(rng.integers(-w // 8, w // 8 + 1)), h), col, max(1, w // 60), _AA)
    return img


def _draw_body(img: np.ndarray, f: _Frame, look: Look) -> None:
    """Shoulders in clothing, long hair falling behind, neck and neckline."""
    _fill(img, f, _ell(0, 2.3, 1.95, 1.0), look.cloth)
    _line(img, f, _ell(0, 2.3, 1.95, 1.0, math.pi * 1.15, math.pi * 1.85), _shade(look.cloth, 0.75), 0.02)
    w = look.face_w
    if look.long_hair:
        top = _ell(0, -0.1, w * 1.25, 1.08, math.pi, 2 * math.pi)
        L = look.hair_len
        xs = np.linspace(w * 1.38, -w * 1.38, 11)
        tips = np.stack([xs, L + 0.07 * (np.arange(11) % 2) - 0.08 * (np.abs(xs) / w - 0.7).clip(0)], 1)
        _fill(img, f, np.vstack([top, [(w * 1.32, 0.5)], tips, [(-w * 1.32, 0.5)]]), look.hair)
    neck = _shade(look.skin, 0.86)
    nw = 0.36 * w / 0.72
    _fill(img, f, np.array([(-nw, 0.4), (nw, 0.4), (nw * 1.05, 1.45), (-nw * 1.05, 1.45)]), neck)
    _fill(img, f, _ell(0, 1.32, nw * 1.1, 0.22, 0, math.pi), neck)


def _draw_head(img: np.ndarray, f: _Frame, look: Look) -> None:
    """Hair volume, ears and the face outline."""
    w = look.face_w
    top = _ell(0, -0.1, w * 1.12, 1.06, math.pi, 2 * math.pi)
    _fill(img, f, np.vstack([top, [(w * 1.07, 0.02), (-w * 1.07, 0.02)]]), look.hair)
    ear = _shade(look.skin, 0.93)
    for sx in (-1, 1):
        _fill(img, f, _ell(sx * w * 0.98, -0.02, 0.085, 0.16), ear)
        _line(img, f, _ell(sx * w * 1.0, -0.02, 0.045, 0.1, -1.2, 1.2), _shade(ear, 0.8), 0.012)
    _fill(img, f, _contour(look, np.linspace(0, 2 * math.pi, 72, endpoint=False)), look.skin)


def _draw_wrinkles(img: np.ndarray, f: _Frame, look: Look) -> None:
    """Forehead lines, crow's feet, eye bags and nasolabial folds, growing with age."""
    wr = look.wrinkles
    if wr <= 0.05:
        return
    col = _shade(look.skin, 1.0 - (0.1 + 0.32 * wr))
    soft = _shade(look.skin, 1.0 - (0.06 + 0.2 * wr))
    xs = np.linspace(-0.27, 0.27, 14)
    for k in range(int(round(wr * 4.4))):
        y = -0.37 - 0.065 * k
        if y < look.hairline + 0.05:
            break
        ys = y + 0.012 * np.sin(xs * 11 + look.wrinkle_phase + k) + 0.025 * (xs / 0.27) ** 2
        _line(img, f, np.stack([xs, ys], 1), col, 0.011)
    for sx in (-1, 1):
        ex = sx * 0.3
        _line(img, f, _ell(ex, -0.07, 0.1, 0.085, 0.5, math.pi - 0.5, 10), soft, 0.01)
        for k in range(1 + int(round(2 * wr))):
            ang = math.radians((-25, 25, 0)[k]) if sx > 0 else math.pi - math.radians((-25, 25, 0)[k])
            x0, y0 = ex + sx * 0.14, -0.09
            ln = 0.05 + 0.07 * wr
            _line(img, f, np.array([(x0, y0), (x0 + ln * math.cos(ang), y0 + ln * math.sin(ang))]), col, 0.009)
        fold = np.array([(sx * 0.12, 0.24), (sx * 0.2, 0.36), (sx * 0.24, 0.5), (sx * 0.25, 0.6)])
        _line(img, f, fold, soft, 0.012)


def _draw_beard(img: np.ndarray, f: _Frame, look: Look) -> None:
    """Stubble shadow or full beard on the lower face (mask drawn later hides it)."""
    if not look.beard:
        return
    t0 = math.asin(0.15)
    grow = 1.0 if look.beard == 1 else 1.03
    edge = _contour(look, np.linspace(t0, math.pi - t0, 30), grow, 0.0 if look.beard == 1 else 0.06)
    w = look.face_w
    inner = np.array([(-w * 0.85, 0.15), (-0.16, 0.33), (0.16, 0.33), (w * 0.85, 0.15)])
    col = _shade(_mix(look.skin, look.hair, 0.2), 0.88) if look.beard == 1 else look.beard_col
    _fill(img, f, np.vstack([edge, inner]), col)


def _draw_eyes(img: np.ndarray, f: _Frame, look: Look, gaze: float) -> None:
    """Eyes with iris, lid line (eyeliner) and eyebrows."""
    for sx in (-1, 1):
        ex = sx * 0.3
        _fill(img, f, _ell(ex, -0.08, 0.11, 0.045), (235.0, 238.0, 240.0))
        cv2.circle(
            img, tuple(f.px([(ex + gaze, -0.08)])[0]), int(0.04 * f.unit * _ONE), (40.0, 48.0, 62.0), -1, _AA, _SHIFT
        )
        cv2.circle(
            img, tuple(f.px([(ex + gaze, -0.08)])[0]), int(0.018 * f.unit * _ONE), (10.0, 10.0, 12.0), -1, _AA, _SHIFT
        )
        _line(img, f, _ell(ex, -0.08, 0.115, 0.048, math.pi, 2 * math.pi, 14), (35.0, 35.0, 45.0), look.eyeliner)
        xs = np.linspace(0.12, 0.46, 10)
        ys = -0.235 - look.brow_arch * np.sin(math.pi * (xs - 0.12) / 0.34) - 0.02 * (xs - 0.12) / 0.34
        _line(img, f, np.stack([sx * xs, ys], 1), look.brow, look.brow_w)


def _draw_nose(img: np.ndarray, f: _Frame, look: Look) -> None:
    """Nose bridge shadow, tip and dark nostrils (what tells an incorrect mask from a correct one)."""
    _fill(img, f, np.array([(0.03, -0.02), (0.065, 0.2), (0.1, 0.22), (0.065, -0.02)]), _shade(look.skin, 0.9))
    _line(
        img,
        f,
        np.array([(-0.1, 0.215), (-0.05, 0.27), (0.0, 0.28), (0.05, 0.27), (0.1, 0.215)]),
        _shade(look.skin, 0.76),
        0.016,
    )
    for sx in (-1, 1):
        _fill(img, f, _ell(sx * 0.05, 0.255, 0.03, 0.015, n=14), _shade(look.skin, 0.42))


def _draw_mouth(img: np.ndarray, f: _Frame, look: Look, smile: float) -> None:
    """Lips (red for most women) with a dark centre line; smile bends the corners."""
    mw = 0.16
    xs = np.linspace(-mw, mw, 15)
    centre = 0.5 - smile * (xs / mw) ** 2
    upper = 0.5 - look.lip_h * (1 - (xs / mw) ** 2)
    lower = 0.5 + look.lip_h * 1.2 * (1 - (xs / mw) ** 2)
    _fill(img, f, np.vstack([np.stack([xs, np.minimum(upper, centre)], 1), np.stack([xs, centre], 1)[::-1]]), look.lips)
    _fill(img, f, np.vstack([np.stack([xs, centre], 1), np.stack([xs, np.maximum(lower, centre)], 1)[::-1]]), look.lips)
    _line(img, f, np.stack([xs, centre], 1), _shade(look.lips, 0.45), 0.012)


def _mask_polygon(look: Look, top: float, bump: float, drop: float, kf94: bool) -> Points:
    """Mask outline: the enlarged lower face outline below a top edge (with a bump over the nose)."""
    t0 = math.asin(max(-0.2, min(0.95, top)))
    thetas = np.linspace(t0, math.pi - t0, 36)
    pts = _contour(look, thetas, 1.05, drop)
    if kf94:
        s = np.sin(thetas)
        pts[:, 0] *= 1.0 + 0.14 * np.exp(-((((s - top) / (1.0 - top) - 0.45) / 0.2) ** 2))
    xs = np.linspace(pts[-1, 0], pts[0, 0], 17)
    ys = top + 0.04 * (xs / look.face_w) ** 2 - bump * np.exp(-((xs / 0.16) ** 2))
    return np.vstack([pts, np.stack([xs, ys], 1)])


def _half_width(poly: Points, y: float) -> float:
    """Approximate half width of a mask polygon at height y (for pleats and folds)."""
    near = poly[np.argsort(np.abs(poly[:, 1] - y))[:4]]
    return float(np.abs(near[:, 0]).mean()) * 0.97


def _draw_pattern(img: np.ndarray, f: _Frame, poly: Points, look: Look, base: Color) -> None:
    """Patterned cloth: dots, stripes or checks inside the mask polygon only."""
    pix = f.px(poly)
    x0, y0 = np.maximum(pix.min(0) // _ONE - 1, 0)
    x1, y1 = pix.max(0) // _ONE + 2
    x1, y1 = min(x1, img.shape[1]), min(y1, img.shape[0])
    if x1 <= x0 or y1 <= y0:
        return
    roi = np.empty((y1 - y0, x1 - x0, 3), np.uint8)
    roi[:] = base
    step = max(3, int(0.11 * f.unit))
    col = look.pattern_col
    if look.pattern == 0:
        for yy in range(step // 2, roi.shape[0], step):
            for xx in range((yy // step % 2) * step // 2, roi.shape[1], step):
                cv2.circle(roi, (xx, yy), max(1, step // 4), col, -1, _AA)
    elif look.pattern == 1:
        for k in range(-roi.shape[0], roi.shape[1], step):
            cv2.line(roi, (k, 0), (k + roi.shape[0], roi.shape[0]), col, max(1, step // 3), _AA)
    else:
        for yy in range(0, roi.shape[0], step):
            for xx in range((yy // step % 2) * step, roi.shape[1], 2 * step):
                cv2.rectangle(roi, (xx, yy), (xx + step - 1, yy + step - 1), col, -1)
    stencil = np.zeros(roi.shape[:2], np.uint8)
    cv2.fillPoly(stencil, [pix - np.array([x0, y0]) * _ONE], 255, cv2.LINE_8, _SHIFT)
    region = img[y0:y1, x0:x1]
    region[stencil > 0] = roi[stencil > 0]


def _draw_mask(img: np.ndarray, f: _Frame, look: Look, style: int, top: float, bump: float, drop: float) -> None:
    """A face mask of one of 5 styles: white, black, surgical (pleats), patterned cloth, KF94."""
    col = look.mask_cols[style]
    poly = _mask_polygon(look, top, bump, drop, style == 4)
    w = look.face_w
    strap = col if style in (1, 3) else _shade(col, 0.95)
    for sx in (-1, 1):
        side = poly[:36][poly[:36, 0] * sx > 0]
        end = side[np.argmin(side[:, 1])]
        low = side[np.argmin(np.abs(side[:, 1] - min(0.85, top + 0.4)))]
        _line(img, f, np.array([tuple(end), (sx * w * 0.99, -0.1)]), strap, 0.02)
        _line(img, f, np.array([tuple(low), (sx * w * 0.99, 0.07)]), strap, 0.02)
    _fill(img, f, poly, col)
    edge = _shade(col, 0.8) if style != 1 else _shade((60, 60, 60), 1.0)
    bottom = float(poly[:, 1].max())
    if style == 3:
        _draw_pattern(img, f, poly, look, col)
    if style == 2:
        for k in range(1, 4):
            y = top + (bottom - top) * (0.15 + 0.22 * k)
            hw = _half_width(poly, y)
            _line(img, f, np.array([(-hw, y), (hw, y)]), _shade(col, 0.82), 0.012)
        _line(img, f, poly[36:], (225.0, 225.0, 225.0), 0.025)
    elif style == 4:
        y = top + (bottom - top) * 0.45
        hw = _half_width(poly, y)
        _line(img, f, np.array([(-hw, y), (0.0, y + 0.03), (hw, y)]), edge, 0.014)
    else:
        _line(img, f, np.array([(0.0, top - bump), (0.0, bottom)]), edge, 0.012)
    _line(img, f, poly, edge, 0.012, closed=True)


def _draw_hair_front(img: np.ndarray, f: _Frame, look: Look) -> None:
    """Hair over the forehead (hairline or bangs), strand texture, and long hair beside the face."""
    w = look.face_w
    ax, ay = w * (1.16 if look.long_hair else 1.12), 1.07
    top = _ell(0, -0.1, ax, ay, math.pi, 2 * math.pi, 30)
    hl = look.hairline
    if look.bangs:
        xs = np.linspace(w * 0.95, -w * 0.95, 13)
        line = np.stack([xs, hl + 0.03 * (np.arange(13) % 2)], 1)
        line = np.vstack([[(w * 1.04, -0.1)], line, [(-w * 1.04, -0.1)]])
    else:
        line = np.array(
            [
                (w * 1.03, -0.1),
                (w * 0.9, hl + 0.25),
                (w * 0.62, hl + 0.05),
                (0.12, hl - 0.03),
                (0.0, hl),
                (-w * 0.62, hl + 0.05),
                (-w * 0.9, hl + 0.25),
                (-w * 1.03, -0.1),
            ]
        )
    _fill(img, f, np.vstack([top, line]), look.hair)
    for k in range(9):
        r = 0.86 + 0.015 * k
        _line(
            img,
            f,
            _ell(0, -0.1, ax * r, ay * r, math.pi + 0.75 + 0.05 * k, 2 * math.pi - 0.7 - 0.04 * k, 14),
            look.strand if k % 2 == 0 else _shade(look.hair, 0.7),
            0.008,
        )
    if look.long_hair:
        L = look.hair_len
        for sx in (-1, 1):
            strand = np.array(
                [
                    (w * 0.86, -0.5),
                    (w * 0.97, 0.0),
                    (w * 1.0, 0.6),
                    (w * 1.08, L),
                    (w * 1.36, L),
                    (w * 1.3, 0.5),
                    (w * 1.2, -0.2),
                    (w * 1.05, -0.62),
                ]
            )
            strand[:, 0] *= sx
            _fill(img, f, strand, look.hair)
            _line(img, f, strand[:4] * np.array([1.06, 1.0]), look.strand, 0.008)


def _finish(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Camera look: slight blur, global brightness/contrast, a lighting ramp and Gaussian noise (uint8 ops, fast)."""
    h, w = img.shape[:2]
    sigma = 0.0016 * h * rng.uniform(0.6, 1.4)
    if sigma >= 0.35:
        img = cv2.GaussianBlur(img, (0, 0), sigma)
    contrast, bright = rng.uniform(0.8, 1.15), rng.uniform(-25, 25)
    img = cv2.LUT(img, np.clip((np.arange(256) - 128.0) * contrast + 128.0 + bright, 0, 255).astype(np.uint8))
    corners = np.repeat((128 * rng.uniform(0.7, 1.3, (2, 2))).astype(np.uint8)[..., None], 3, axis=2)
    img = cv2.multiply(img, cv2.resize(corners, (w, h), interpolation=cv2.INTER_LINEAR), scale=1 / 128)
    # Gaussian noise from random bytes through a quantile table: much faster than standard_normal.
    noise = np.frombuffer(rng.bytes(img.size), np.uint8).reshape(img.shape)
    q = np.round(_NORMAL_Q * rng.uniform(1.5, 6.0))
    img = cv2.add(img, cv2.LUT(noise, np.clip(q, 0, 255).astype(np.uint8)))
    return cv2.subtract(img, cv2.LUT(noise, np.clip(-q, 0, 255).astype(np.uint8)))


def _mask_placement(rng: np.random.Generator, stem: str, look: Look) -> tuple[int, float, float, float] | None:
    """(style, top, bump, drop) of the mask for a stem; None for 'normal'."""
    if stem == "normal":
        return None
    if stem == "incorrect_mask":
        style = int(rng.integers(5))
        if rng.random() < 0.35:
            return style, float(rng.uniform(0.6, 0.68)), 0.0, float(rng.uniform(0.12, 0.18))
        return style, float(rng.uniform(0.31, 0.38)), float(rng.uniform(-0.02, 0.02)), float(rng.uniform(0.05, 0.1))
    style = look.mask_order[int(stem[4]) - 1]
    return style, float(rng.uniform(0.03, 0.08)), float(rng.uniform(0.05, 0.08)), float(rng.uniform(0.03, 0.07))


def render_photo(person: Person, stem: str, rng: np.random.Generator, image_size: tuple[int, int]) -> np.ndarray:
    """One (H, W, 3) uint8 BGR photo of a person in the mask status named by the file stem."""
    h, w = image_size
    img = _background(rng, h, w)
    f = _frame(rng, h, w)
    look = person.look
    _draw_body(img, f, look)
    _draw_head(img, f, look)
    _draw_wrinkles(img, f, look)
    _draw_beard(img, f, look)
    _draw_eyes(img, f, look, float(rng.uniform(-0.025, 0.025)))
    _draw_nose(img, f, look)
    _draw_mouth(img, f, look, float(rng.uniform(-0.015, 0.04)))
    placement = _mask_placement(rng, stem, look)
    if placement is not None:
        _draw_mask(img, f, look, *placement)
    _draw_hair_front(img, f, look)
    return _finish(img, rng)


def render_person(person: Person, image_size: tuple[int, int]) -> dict[str, np.ndarray]:
    """All 7 photos of a person (stem -> image), without encoding them."""
    rng = _rng(person.seed, _PHOTOS, person.index)
    return {stem: render_photo(person, stem, rng, image_size) for stem in STEMS}


# ----------------------------------------------------------------------------------------------- writing


def _encode(img: np.ndarray, ext: str, rng: np.random.Generator) -> bytes:
    """JPEG (quality 85-95) or PNG bytes according to the extension, case-insensitively."""
    quality = int(rng.integers(85, 96))  # drawn for PNG too: the RNG stream does not depend on the format
    if ext.lower() == ".png":
        ok, buf = cv2.imencode(".png", img, _PNG_PARAMS)
    else:
        ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError(f"cv2 could not encode a {ext} image")
    return buf.tobytes()


def _junk_bytes(rng: np.random.Generator, kind: str) -> bytes:
    """Bytes of a macOS AppleDouble ('._x') or .DS_Store junk file: a header and random bytes, not an image."""
    head = b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        " if kind == "apple" else b"\x00\x00\x00\x01Bud1"
    return head + rng.integers(0, 256, int(rng.integers(200, 600)), dtype=np.uint8).tobytes()


def eval_image_id(seed: int, pid: str, stem: str, ext: str) -> str:
    """40-hex-character eval file name derived from (seed, person, file), plus .jpg or .png."""
    digest = hashlib.sha1(f"pstage-demo/{seed}/{pid}/{stem}".encode()).hexdigest()
    return digest + (".png" if ext.lower() == ".png" else ".jpg")


def _write_person(job: _Job) -> list[dict[str, object]]:
    """Render, encode and write the 7 photos (and junk) of one person; returns its CSV rows."""
    root, seed, index, persons, image_size = job
    person = person_spec(seed, index, persons)
    rng = _rng(seed, _PHOTOS, index)
    if person.split == "train":
        folder = Path(root) / "train" / "images" / person.path
        folder.mkdir(parents=True, exist_ok=True)
        for stem in STEMS:
            (folder / f"{stem}{person.ext}").write_bytes(
                _encode(render_photo(person, stem, rng, image_size), person.ext, rng)
            )
        if person.junk:
            (folder / f"._{STEMS[0]}{person.ext}").write_bytes(_junk_bytes(rng, "apple"))
        if person.junk == 2:
            (folder / ".DS_Store").write_bytes(_junk_bytes(rng, "ds"))
        return [{"id": person.pid, "gender": person.gender, "race": "Asian", "age": person.age, "path": person.path}]
    rows = []
    for stem in STEMS:
        image_id = eval_image_id(seed, person.pid, stem, person.ext)
        ext = Path(image_id).suffix
        (Path(root) / "eval" / "images" / image_id).write_bytes(
            _encode(render_photo(person, stem, rng, image_size), ext, rng)
        )
        gender = GENDERS[person.gender]
        rows.append(
            {
                "ImageID": image_id,
                "ans": truth_class(stem, person.gender, person.age),
                "mask": MASK_STEMS[stem],
                "gender": gender,
                "age": person.age,
                "person": person.pid,
            }
        )
    return rows


def _run_jobs(jobs: list[_Job], workers: int) -> list[list[dict[str, object]]]:
    """Run person jobs in order; in a process pool when workers > 1.

    Spawned, not forked: forking a process whose torch/OpenCV thread pools are already running
    (a notebook or test session that trained a model) deadlocks the children.
    """
    if workers <= 1 or len(jobs) <= 1:
        return [_write_person(job) for job in jobs]
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(min(workers, len(jobs)), ctx, initializer=cv2.setNumThreads, initargs=(1,)) as pool:
        return list(pool.map(_write_person, jobs, chunksize=max(1, len(jobs) // (workers * 8))))


def _manifest(persons: int, eval_persons: int, image_size: tuple[int, int], seed: int) -> dict[str, object]:
    """Arguments identifying a generated data set (workers excluded: bytes do not depend on them)."""
    return {
        "generator": "pstage.data.synthetic",  # the generator's id in manifests: data sets already written stay reusable
        "version": GENERATOR_VERSION,
        "persons": persons,
        "eval_persons": eval_persons,
        "image_size": list(image_size),
        "seed": seed,
    }


def _is_complete(root: Path, manifest: dict[str, object]) -> bool:
    """True when root holds a finished data set generated with the same arguments."""
    try:
        found = json.loads((root / MANIFEST_FILE).read_text())
    except (OSError, ValueError):
        return False
    same = isinstance(found, dict) and all(found.get(k) == v for k, v in manifest.items())
    files = ("train/train.csv", "eval/info.csv", TRUTH_FILE)
    return (
        same
        and all((root / name).is_file() for name in files)
        and (root / "train" / "images").is_dir()
        and (root / "eval" / "images").is_dir()
    )


def _clean(root: Path) -> None:
    """Remove only the entries this module owns (manifest first, so a crash never looks complete)."""
    for name in _OWNED:
        target = root / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()


def _check_args(persons: int, eval_persons: int, image_size: Sequence[int], seed: int) -> tuple[int, int]:
    """Validate the arguments; returns image_size as a (H, W) tuple of ints."""
    if len(image_size) != 2 or min(int(v) for v in image_size) < 16:
        raise ValueError(f"image_size must be (H, W) with both >= 16, got {image_size!r}")
    if persons < 1 or eval_persons < 1:
        raise ValueError(f"persons and eval_persons must be >= 1, got {persons} and {eval_persons}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    return int(image_size[0]), int(image_size[1])


def _write_tables(
    root: Path, seed: int, train_rows: list[dict[str, object]], eval_rows: list[dict[str, object]]
) -> None:
    """train.csv, eval/info.csv (deterministically shuffled, ans=0) and demo_truth.csv in the same order."""
    pd.DataFrame(train_rows, columns=TRAIN_COLUMNS).to_csv(root / "train" / "train.csv", index=False)
    truth = pd.DataFrame(eval_rows, columns=TRUTH_COLUMNS)
    truth = truth.iloc[_rng(seed, _SHUFFLE).permutation(len(truth))].reset_index(drop=True)
    truth.assign(ans=0)[INFO_COLUMNS].to_csv(root / "eval" / "info.csv", index=False)
    truth.to_csv(root / TRUTH_FILE, index=False)


def make_demo_data(
    root: str | os.PathLike[str],
    persons: int = 300,
    eval_persons: int = 60,
    image_size: tuple[int, int] = (512, 384),
    seed: int = 0,
    workers: int | None = None,
) -> Path:
    """Generate (or reuse, when already complete with the same arguments) the synthetic mask data set at root.

    image_size is the (H, W) of the photos; workers is the number of processes (None: os.cpu_count()), the bytes
    written do not depend on it. Workers are spawned processes, so with workers > 1 a calling script needs the
    usual `if __name__ == "__main__":` guard (the pstage CLI, notebooks and pytest need nothing). Returns Path(root).
    """
    root = Path(root)
    size = _check_args(persons, eval_persons, image_size, seed)
    manifest = _manifest(persons, eval_persons, size, seed)
    if _is_complete(root, manifest):
        return root
    _clean(root)
    (root / "train" / "images").mkdir(parents=True)
    (root / "eval" / "images").mkdir(parents=True)
    jobs = [(str(root), seed, i, persons, size) for i in range(persons + eval_persons)]
    results = _run_jobs(jobs, workers if workers is not None else (os.cpu_count() or 1))
    train_rows = [row for rows in results[:persons] for row in rows]
    eval_rows = [row for rows in results[persons:] for row in rows]
    _write_tables(root, seed, train_rows, eval_rows)
    junk_rng = _rng(seed, _JUNK)
    (root / "eval" / "images" / f"._{eval_rows[0]['ImageID']}").write_bytes(_junk_bytes(junk_rng, "apple"))
    counts = {"train_persons": persons, "train_images": 7 * persons, "eval_images": len(eval_rows)}
    (root / MANIFEST_FILE).write_text(json.dumps({**manifest, **counts}, indent=2) + "\n")
    return root
