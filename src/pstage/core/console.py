"""One rich console for pstage's messages, and a quieter Lightning (no banner noise per fold)."""

from __future__ import annotations

import logging
import os
import sys
import warnings

from rich.console import Console

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
