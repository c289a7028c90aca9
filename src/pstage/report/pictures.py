"""A run's training pictures as its models saw them (the report's mistakes grid, the audit's tiles)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from pstage.core.errors import RunError
from pstage.data.prepare import prepare_caches
from pstage.data.sources import load_source
from pstage.runs.rundir import Run


def training_images(run: Run) -> tuple[Any, pd.Series]:
    """The run's training images as the model saw them: (cache memmap, image_id -> cache row)."""
    if run.info.kind == "ensemble":  # members share the data and split: read the images via the first
        return training_images(Run(run.leaves(run.path.parent)[0].path))
    config = run.load_config()
    if not config.data.path or not Path(config.data.path).exists():
        raise RunError(f"{run.name}: its data {config.data.path} is not here; the report needs the training images")
    source = load_source(config.data)
    source, cache, _ = prepare_caches(source, config, verbose=False)
    return cache.open(), source.train.set_index("image_id")["cache_row"]


def pictures_of(run: Run) -> tuple[Any, pd.Series] | str:
    """``training_images(run)``, or the reason the pictures cannot be shown (the page stands without them)."""
    try:
        return training_images(run)
    except RunError as exc:  # the data moved away: tables and plots still tell most of the story
        return str(exc)
