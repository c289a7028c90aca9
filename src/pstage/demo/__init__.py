"""``pstage demo``: the whole flow on generated data (flow.py), and the data it draws (synthetic.py).

The names load on first use: ``make_demo_data``'s worker processes import ``pstage.demo.synthetic``,
which runs this file, and must not pull in the training stack that ``run_demo`` needs.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_API = {
    "run_demo": "pstage.demo.flow",
    "DemoResult": "pstage.demo.flow",
    "DemoPlan": "pstage.demo.flow",
    "FULL": "pstage.demo.flow",
    "QUICK": "pstage.demo.flow",
    "score_on_truth": "pstage.demo.flow",
    "make_demo_data": "pstage.demo.synthetic",
    "TRUTH_FILE": "pstage.demo.synthetic",
}

__all__ = list(_API)


def __getattr__(name: str) -> Any:
    if name in _API:
        value = getattr(import_module(_API[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'pstage.demo' has no attribute {name!r}")
