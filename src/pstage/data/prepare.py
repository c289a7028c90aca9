"""Caches for a source: decode every train and test image once (``data.cache``) and drop or
report unreadable ones. Training, prediction, reports and benchmarks all start here."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from pstage.config import Config, DataConfig
from pstage.core.console import console
from pstage.core.errors import DataError
from pstage.data.cache import CacheInfo, build_cache
from pstage.data.faces import resolve_detector
from pstage.data.sources import Source, detect_kind


class Prepared(NamedTuple):
    """A source whose training table has a ``cache_row`` column, with its train and test caches."""

    source: Source
    train: CacheInfo
    test: CacheInfo | None


def resolve_face_crop(d: DataConfig) -> DataConfig:
    """``d`` with ``face_crop`` a bool and ``face_detector`` one that runs here (Haar when RetinaFace cannot).

    ``face_crop=auto`` is on for the mask task (competition layout) when the CNN detector runs here:
    the crop is what it measured best for there, and Haar misses half the masked faces.
    """
    crop = d.face_crop
    detector = resolve_detector(d.face_detector) if crop is not False else d.face_detector
    if crop == "auto":
        kind = d.source if d.source != "auto" else (detect_kind(Path(d.path)) if d.path else "")
        crop = kind == "competition" and detector == "retinaface"
    return d.model_copy(update={"face_crop": bool(crop), "face_detector": detector})


def data_cache(paths: Sequence[str], d: DataConfig, progress: Callable[[int], None] | None = None) -> CacheInfo:
    """``paths`` decoded into the cache with the data config's settings (size, crop, detector, folder).

    The one place that turns ``data.*`` into a cache, so training, predict and export read the same
    pixels; ``d.face_crop`` must already be resolved (a run's saved config is).
    """
    return build_cache(
        list(paths),
        d.image_size,
        face_crop=d.face_crop,
        face_margin=d.face_margin,
        center_crop=d.center_crop,
        face_detector=d.face_detector,
        cache_dir=d.cache_dir,
        progress=progress,
    )


def prepare_caches(source: Source, cfg: Config, verbose: bool = True) -> Prepared:
    """Decode train and test images into the cache; handle bad images per ``data.on_bad_image``.

    Returns a new source (the given one is left as it was) whose training table has a ``cache_row``
    column (its row in the cache) and, in skip mode, lacks the unreadable training images. Unreadable test images are predicted from a blank
    frame in skip mode (a submission needs every row) and reported.
    """
    d = resolve_face_crop(cfg.data)
    caches = []
    skipped = list(source.skipped)
    for label, table in (("train", source.train), ("test", source.test)):
        if table is None:
            caches.append(None)
            continue
        started = time.time()
        if verbose and len(table) > 500:
            with console.status(f"decoding {len(table):,} {label} images into the cache ...") as status:
                cache = data_cache(
                    table["path"].tolist(),
                    d,
                    progress=lambda n, s=status, t=len(table), what=label: (
                        n % 200 == 0 and s.update(f"decoding {what} images into the cache: {n:,}/{t:,}")
                    ),
                )
        else:
            cache = data_cache(table["path"].tolist(), d)
        if verbose:
            what = f"decoded in {time.time() - started:.1f}s" if cache.decoded else "reused, 0 decoded"
            faces = (
                f", {cache.detector} found a face in {cache.faces_found}/{cache.count - len(cache.bad)}"
                f"{f' ({cache.detected} detected now)' if cache.detected else ''} (centre crop for the rest)"
                if d.face_crop
                else ""
            )
            console.print(f"  cache {label}: {cache.count:,} images {what}{faces} [dim]({cache.path})[/]")
        if cache.bad:
            path, reason = next(iter(cache.bad.items()))
            if d.on_bad_image == "error":
                more = f" ({len(cache.bad) - 1} more bad images)" if len(cache.bad) > 1 else ""
                raise DataError(
                    f"{path}: {reason}{more}; fix or remove it, or set data.on_bad_image=skip to leave such images out"
                )
            skipped.extend(
                f"{p}: {r}" + (" (predicted from a blank image)" if label == "test" else "")
                for p, r in cache.bad.items()
            )
            if verbose:
                console.print(
                    f"  [yellow]skipped {len(cache.bad)} unreadable {label} image(s)[/], e.g. {path}: {reason}"
                )
        caches.append(cache)
    train = source.train.assign(cache_row=np.arange(len(source.train)))
    if caches[0].bad:
        train = train[~train["path"].isin(caches[0].bad)].reset_index(drop=True)
    if verbose and skipped and not caches[0].bad:
        console.print(f"  [yellow]skipped {len(skipped)} problem(s) in the data[/], e.g. {skipped[0]}")
    return Prepared(dataclasses.replace(source, train=train, skipped=skipped), caches[0], caches[1])
