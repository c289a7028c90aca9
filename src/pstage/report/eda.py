"""``pstage eda``: one HTML page that shows what is in the data before anything is trained.

Class and task counts, persons per gender x age, the age histogram against the bucket
thresholds, images per person (with the persons whose folders are incomplete), image sizes and
formats, a sample grid per class, near-duplicate photos across persons (perceptual hash), and
what the face detector finds. The winning teams of this competition won on data; this page is
where they would have started.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import imagehash
import numpy as np
import pandas as pd
from PIL import Image

from pstage.config import Config, load_config
from pstage.core.tasks import MASK_NAMES
from pstage.data.cache import BadImage, decode
from pstage.data.faces import face_box
from pstage.data.prepare import resolve_face_crop
from pstage.data.sources import Source, load_source
from pstage.report.pages import figure, image_tag, new_figure, page, table, tiles

SAMPLES_PER_CLASS = 6
FACE_SAMPLE = 120
DUPLICATE_BITS = 4  # perceptual hashes differing in at most this many of 64 bits count as near-duplicates


@dataclass
class EdaResult:
    """Where the page went, and the numbers it shows (also handy in a notebook)."""

    path: Path
    images: int
    persons: int
    class_counts: dict[str, int]
    duplicates: pd.DataFrame
    face_hit_rate: float | None
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0
    face_detector: str = ""  # the detector behind face_hit_rate
    face_hit_rates: dict[str, float] = field(default_factory=dict)  # per mask state (mask task)


def perceptual_hashes(paths: list[str]) -> np.ndarray:
    """64-bit pHash per image (0 for unreadable ones), decoding JPEGs at reduced size for speed."""
    out = np.zeros(len(paths), dtype=np.uint64)
    for i, path in enumerate(paths):
        try:
            with Image.open(path) as image:
                image.draft("L", (64, 64))  # JPEG decodes at 1/2..1/8 scale: ~5x faster, same hash
                bits = imagehash.phash(image.convert("L")).hash.flatten()
        except (OSError, ValueError):
            continue
        out[i] = np.packbits(bits).view(">u8")[0]
    return out


def near_duplicates(hashes: np.ndarray, groups: np.ndarray, max_bits: int = DUPLICATE_BITS) -> pd.DataFrame:
    """Pairs (i, j, bits) of images from different persons whose hashes differ in <= ``max_bits`` bits."""
    found = []
    valid = hashes != 0
    for i in range(len(hashes)):
        if not valid[i]:
            continue
        rest = slice(i + 1, None)
        distance = np.bitwise_count(hashes[rest] ^ hashes[i])
        hits = np.nonzero((distance <= max_bits) & valid[rest] & (groups[rest] != groups[i]))[0] + i + 1
        found.extend((i, int(j), int(distance[j - i - 1])) for j in hits)
    return pd.DataFrame(found, columns=["i", "j", "bits"]).sort_values(["bits", "i"]).reset_index(drop=True)


def _image_headers(paths: list[str]) -> pd.DataFrame:
    """Size and real format of each file from its header (no decoding)."""
    rows = []
    for path in paths:
        suffix = Path(path).suffix.lower()
        try:
            with Image.open(path) as image:
                rows.append((image.width, image.height, image.format or "?", suffix))
        except (OSError, ValueError):
            rows.append((0, 0, "unreadable", suffix))
    return pd.DataFrame(rows, columns=["width", "height", "format", "extension"])


def _bars(counts: pd.Series, title: str, rotate: bool = False) -> str:
    fig, ax = new_figure(max(4.0, 0.45 * len(counts) + 1.5), 3.2)
    ax.bar(range(len(counts)), counts.to_numpy(), color="#4c78a8")
    ax.set_xticks(range(len(counts)), [str(i) for i in counts.index], rotation=75 if rotate else 0, fontsize=8)
    ax.set_title(title)
    for x, value in enumerate(counts.to_numpy()):
        ax.text(x, value, str(value), ha="center", va="bottom", fontsize=7)
    return figure(fig, title)


def _class_section(source: Source) -> str:
    task, train = source.task, source.train
    counts = train["target"].value_counts().reindex(range(task.num_classes), fill_value=0)
    counts.index = [f"{i} {name}" for i, name in enumerate(task.classes)]
    parts = [_bars(counts, f"images per class ({len(train):,} training images)", rotate=True)]
    rare = counts[counts < counts.max() / 10]
    if len(rare):
        parts.append(
            f"<p class='warn'>{len(rare)} class(es) have under a tenth of the largest class's images: "
            f"{', '.join(rare.index)} — consider loss.class_weights=balanced or train.sampler=balanced.</p>"
        )
    if task.has_subtasks:
        for head, names in task.heads.items():
            head_targets = np.asarray(task.class_to_head[head])[train["target"].to_numpy()]
            per = pd.Series(head_targets).value_counts().reindex(range(len(names)), fill_value=0)
            per.index = names
            parts.append(_bars(per, f"{head}: images per class"))
    return "".join(parts)


def _persons_section(source: Source, cfg: Config) -> str:
    train = source.train
    persons = train.groupby("group").first()
    parts = []
    if {"gender", "age_bucket"} <= set(persons.columns):
        ages = source.task.heads["age"]
        cross = pd.crosstab(persons["gender"].map({0: "male", 1: "female"}), persons["age_bucket"]).reindex(
            columns=range(len(ages)), fill_value=0
        )
        rows = [[gender, *cross.loc[gender].tolist(), int(cross.loc[gender].sum())] for gender in cross.index]
        parts.append("<p>Persons per gender x age bucket (the split stratifies on this):</p>")
        parts.append(table(["gender", *ages, "total"], rows))
    if "age" in persons.columns:
        fig, ax = new_figure(7, 3)
        ax.hist(persons["age"], bins=range(int(persons["age"].min()), int(persons["age"].max()) + 2), color="#72b7b2")
        for threshold in cfg.data.age_thresholds:
            ax.axvline(threshold - 0.5, color="#e45756", linestyle="--")
            ax.text(threshold - 0.5, ax.get_ylim()[1] * 0.95, f" {threshold}", color="#e45756")
        ax.set_xlabel("age (persons)")
        ax.set_title("age histogram; dashed: bucket thresholds (data.age_thresholds)")
        parts.append(figure(fig, "age histogram"))
        near = persons[
            np.any([(persons["age"] >= t - 3) & (persons["age"] < t) for t in cfg.data.age_thresholds], axis=0)
        ]
        parts.append(
            f"<p>{len(near)} person(s) are within 3 years below a threshold (borderline ages, the hardest to tell apart).</p>"
        )
    return "".join(parts)


def _per_person_section(source: Source, problems: list[str]) -> str:
    per = source.train.groupby("group").size()
    hist = per.value_counts().sort_index()
    parts = [table(["images per person", "persons"], [[int(k), int(v)] for k, v in hist.items()])]
    if source.kind == "competition":
        incomplete = per[per != 7]
        parts.append(f"<p>{len(incomplete)} person folder(s) do not hold exactly 7 photos.</p>")
    if problems:
        shown = "".join(f"<li>{p}</li>" for p in problems[:30])
        more = f"<li>... {len(problems) - 30} more</li>" if len(problems) > 30 else ""
        parts.append(f"<p class='warn'>{len(problems)} problem(s) in the data:</p><ul>{shown}{more}</ul>")
    return "".join(parts)


def _formats_section(headers: pd.DataFrame) -> str:
    sizes = headers.groupby(["width", "height"]).size().sort_values(ascending=False).head(10)
    formats = headers.groupby(["format", "extension"]).size().sort_values(ascending=False)
    parts = [
        table(["width x height", "images"], [[f"{w}x{h}", int(n)] for (w, h), n in sizes.items()]),
        table(["format", "extension", "images"], [[f, e, int(n)] for (f, e), n in formats.items()], left=2),
    ]
    wrong = headers[
        ((headers["format"] == "PNG") & headers["extension"].isin([".jpg", ".jpeg"]))
        | ((headers["format"] == "JPEG") & (headers["extension"] == ".png"))
    ]
    if len(wrong):
        parts.append(f"<p class='warn'>{len(wrong)} file(s) have an extension that does not match their format.</p>")
    return "".join(parts)


def _load(path: str) -> np.ndarray | None:
    try:
        return decode(path)
    except BadImage:
        return None


def _samples_section(source: Source, seed: int) -> str:
    rng = np.random.default_rng(seed)
    rows = []
    for c, name in enumerate(source.task.classes):
        paths = source.train.loc[source.train["target"] == c, "path"].to_numpy()
        chosen = rng.choice(paths, size=min(SAMPLES_PER_CLASS, len(paths)), replace=False) if len(paths) else []
        images = [(image, Path(p).parent.name + "/" + Path(p).name) for p in chosen if (image := _load(p)) is not None]
        cells = "".join(image_tag(img, cap) for img, cap in images)
        rows.append(f"<div class='row'><span>{c} {name} ({len(paths)})</span>{cells or '<em>none</em>'}</div>")
    return "".join(rows)


def _duplicates_section(source: Source, pairs: pd.DataFrame) -> str:
    train = source.train
    if pairs.empty:
        return f"<p>No near-duplicate photos across persons (pHash distance ≤ {DUPLICATE_BITS} of 64 bits).</p>"
    items = []
    for row in pairs.head(8).itertuples():
        for index in (row.i, row.j):
            image = _load(train["path"].iloc[index])
            if image is not None:
                items.append((image, f"{train['image_id'].iloc[index]}\n{row.bits} bits apart"))
    return (
        f"<p class='warn'>{len(pairs)} pair(s) of near-identical photos belong to different persons (pHash distance ≤ "
        f"{DUPLICATE_BITS} bits): the same person filed twice leaks between folds, or a copy error. First pairs:</p>"
        + tiles(items)
    )


def _faces_section(source: Source, cfg: Config, seed: int) -> tuple[str, float | None, str, dict[str, float]]:
    """What the face detector finds on sampled photos: its hit rate (per mask state for the mask task) and crops.

    Returns the HTML, the hit rate, the detector's name and the hit rate per mask state.
    """
    data = resolve_face_crop(cfg.data)
    detector = data.face_detector
    paths = source.train["path"].to_numpy()
    if not len(paths):
        return "<p>No images.</p>", None, detector, {}
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(paths), size=min(FACE_SAMPLE, len(paths)), replace=False)
    states = source.train["mask"].to_numpy()[chosen] if "mask" in source.train else None
    found = np.zeros(len(chosen), bool)
    crops, misses = [], []
    height, width = cfg.data.image_size
    for i, index in enumerate(chosen):
        path = paths[index]
        image = _load(path)
        if image is None:
            continue
        caption = f"{Path(path).parent.name}/{Path(path).name}"
        box = face_box(image, width / height, cfg.data.face_margin, detector)
        if box is None:
            if len(misses) < 6:
                misses.append((image, f"{caption}\nno face found"))
            continue
        found[i] = True
        if len(crops) < 12:
            x0, y0, x1, y1 = box
            crops.append((image[y0:y1, x0:x1], caption))
    rate = float(found.mean())
    by_state = {}
    if states is not None:
        by_state = {
            MASK_NAMES[m]: float(found[states == m].mean()) for m in range(len(MASK_NAMES)) if (states == m).any()
        }
    per_state = (
        " By mask state: "
        + ", ".join(
            f"{name} <b>{hit:.0%}</b> ({int((states == MASK_NAMES.index(name)).sum())})"
            for name, hit in by_state.items()
        )
        + "."
        if by_state
        else ""
    )
    setting = cfg.data.face_crop if cfg.data.face_crop != "auto" else f"auto, so {str(data.face_crop).lower()} here"
    text = (
        f"<p>The face detector <b>{detector}</b> (data.face_detector) finds a face in <b>{int(found.sum())}/{len(chosen)}</b> "
        f"sampled photos ({rate:.0%}); the rest fall back to a centre crop.{per_state} "
        f"The face crop is {'on' if data.face_crop else 'off'} for this data (data.face_crop={setting}). "
        f"Crops it makes (face_margin {cfg.data.face_margin}):</p>"
        + tiles(crops)
        + ("<p>Photos where it finds none:</p>" + tiles(misses) if misses else "")
    )
    return text, rate, detector, by_state


def eda(
    data: str | Path,
    out: str | Path = "eda.html",
    *,
    config: str | Path | dict[str, Any] | None = None,
    overrides: list[str] | tuple[str, ...] = (),
) -> EdaResult:
    """Write the EDA page for ``data`` (any source pstage reads) and return its key numbers."""
    started = time.time()
    cfg = load_config(config, list(overrides))
    cfg.data.path = str(Path(data).expanduser().resolve())
    # Describe problems instead of stopping at the first one: that is what the page is for.
    source = load_source(cfg.data.model_copy(update={"on_bad_image": "skip"}))
    train = source.train
    problems = list(source.skipped)
    headers = _image_headers(train["path"].tolist() + ([] if source.test is None else source.test["path"].tolist()))
    problems += [
        f"{p}: unreadable" for p, f in zip(train["path"], headers["format"], strict=False) if f == "unreadable"
    ]
    hashes = perceptual_hashes(train["path"].tolist())
    pairs = near_duplicates(hashes, train["group"].to_numpy())
    faces_html, face_rate, detector, face_rates = _faces_section(source, cfg, cfg.seed)
    counts = Counter(train["target"].tolist())
    test_count = 0 if source.test is None else len(source.test)
    summary = table(
        ["", "value"],
        [
            ["data", str(source.root)],
            ["layout", source.kind],
            ["training images", f"{len(train):,}"],
            ["persons / groups", f"{train['group'].nunique():,}"],
            ["classes", source.task.num_classes],
            ["test images", f"{test_count:,}"],
            ["problems", len(problems)],
            ["near-duplicate pairs across persons", len(pairs)],
        ],
    )
    sections = [
        ("summary", "Summary", summary),
        ("classes", "Counts per class and per task", _class_section(source)),
        ("persons", "Persons: gender x age, age histogram", _persons_section(source, cfg)),
        ("per-person", "Images per person", _per_person_section(source, problems)),
        ("formats", "Image sizes and formats", _formats_section(headers)),
        ("samples", "Samples per class", _samples_section(source, cfg.seed)),
        ("duplicates", "Near-duplicates across persons", _duplicates_section(source, pairs)),
        ("faces", "Face crop", faces_html),
    ]
    path = page(f"EDA: {source.root.name}", f"pstage eda --data {source.root}", sections, out)
    duplicates = pd.DataFrame(
        {
            "image_a": train["image_id"].to_numpy()[pairs["i"].to_numpy(dtype=int)],
            "image_b": train["image_id"].to_numpy()[pairs["j"].to_numpy(dtype=int)],
            "bits": pairs["bits"].to_numpy(),
        }
    )
    return EdaResult(
        path,
        len(train),
        int(train["group"].nunique()),
        {source.task.classes[c]: int(n) for c, n in sorted(counts.items())},
        duplicates,
        face_rate,
        problems,
        time.time() - started,
        detector,
        face_rates,
    )
