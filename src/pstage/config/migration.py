"""Old run configs: the values a run's saved config.yaml implies for keys it predates.

A key added later gets a default for new runs; a run saved without it must keep behaving as it
did when it was trained (re-predicting, exporting or serving it gives its own predictions back).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pstage.config.loading import load_config, merge, read_yaml
from pstage.config.sections import Config

# section -> key -> the value a saved config without that key ran with
IMPLIED: dict[str, dict[str, Any]] = {
    "data": {"face_detector": "haar"},  # the only detector there was: its crops are what the models saw
    "tta": {"train": False},  # its own predictions were single-view, so its export and re-predictions stay so
}


def load_run_config(path: str | Path) -> Config:
    """A run's saved config.yaml, with the values it implies for keys it lacks (``IMPLIED``)."""
    values = read_yaml(path)
    for section, implied in IMPLIED.items():
        saved = values.get(section)
        if isinstance(saved, dict):
            missing = {key: value for key, value in implied.items() if key not in saved}
            if missing:
                values = merge(values, {section: missing})
    return load_config(values)
