"""Atomic file writes: every file a later stage reads is written to a temporary name and renamed,
so a crash leaves either the old file or the new one, never half of one."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import Any

import pandas as pd

from pstage.core.errors import DataError


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).astimezone().isoformat(timespec="seconds")


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")


def write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (temp file in the same folder + os.replace)."""
    path = Path(path)
    tmp = _tmp(path)
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path: str | Path, values: Any) -> None:
    write_text(path, json.dumps(values, indent=2, default=str) + "\n")


def write_csv(path: str | Path, frame: pd.DataFrame, float_format: str | None = None) -> None:
    path = Path(path)
    tmp = _tmp(path)
    frame.to_csv(tmp, index=False, float_format=float_format)
    os.replace(tmp, path)


def sha256_file(path: str | Path) -> str:
    """The file's sha256 hex digest, read 1 MiB at a time (checkpoints and ONNX graphs can be large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_json(path: str | Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def read_csv_table(path: Path, required: list[str], hint: str) -> pd.DataFrame:
    """A CSV read as strings with stripped column names; missing file, bad CSV or missing columns: one line."""
    if not path.is_file():
        raise DataError(f"{path} not found; {hint}")
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as exc:
        raise DataError(f"{path}: not a readable CSV ({str(exc).splitlines()[0]})") from None
    frame.columns = [c.strip() for c in frame.columns]
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)} (found: {', '.join(frame.columns) or 'none'})")
    return frame
