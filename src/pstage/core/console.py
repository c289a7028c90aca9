"""One rich console for pstage's messages, and a quieter Lightning (no banner noise per fold)."""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Callable
from typing import TypeVar

from rich.console import Console
from rich.markup import escape

T = TypeVar("T")

# Piped output (CI logs, `| tee`) gets long lines instead of rich's 80-column wrapping.
console = Console(highlight=False, width=None if sys.stdout.isatty() or "COLUMNS" in os.environ else 160)


def quiet_lightning() -> None:
    """Hide Lightning's per-Trainer banners and hints that do not apply to pstage's loaders."""
    for name in (
        "lightning.pytorch",
        "lightning.fabric",
        "lightning.pytorch.utilities.rank_zero",
        "lightning.pytorch.accelerators.cuda",
    ):
        logging.getLogger(name).setLevel(logging.WARNING)
    for pattern in (
        ".*does not have many workers.*",
        ".*The number of training batches.*is smaller than the logging interval.*",
        ".*Checkpoint directory.*exists and is not empty.*",
        ".*`isinstance.*treespec.*",
        ".*LeafSpec.*",
        ".*Found .* module.s. in eval mode at the start of training.*",
        ".*which is not a file-like object.*",
        ".*You are using a CUDA device.*Tensor Cores.*",
    ):
        warnings.filterwarnings("ignore", message=pattern)


def first_line(exc: BaseException, limit: int = 200) -> str:
    """``Type: first line of the message``, shortened: how an exception is named in one line."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def optional_step(what: str, step: Callable[[], T]) -> tuple[T | None, str | None]:
    """Run a step that finished work does not depend on (person grouping, the final fit, publishing).

    Returns (its result, None), or (None, the reason) after one console line when it fails: such a
    failure must never turn a finished training into a traceback. Ctrl-C and exits still stop
    the command (BaseException is not caught).
    """
    try:
        return step(), None
    except Exception as exc:  # noqa: BLE001 - any failure of an optional step leaves finished work as it is
        reason = first_line(exc)
        console.print(f"  [yellow]{what} skipped[/] ({escape(reason)})")
        return None, reason
