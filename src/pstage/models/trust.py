"""``--trust``: whether a fold checkpoint of a run made on this machine may hold pickled objects.

Checkpoints are loaded with ``torch.load(weights_only=True)`` (models/checkpoint.py); a local
checkpoint that needs more loads only when the command was given ``--trust`` (``trust=True`` in
the API). The commands that read checkpoints (predict, report, export, serve, distill) take the
flag; the layers below them read it from a context variable, so no inner function needs another
argument and the setting never outlives the call. Torch-free, so export and serve can import it.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])

_TRUST: ContextVar[bool] = ContextVar("pstage_trust_checkpoints", default=False)


def trusted() -> bool:
    """Whether the command running now was given ``--trust``."""
    return _TRUST.get()


@contextmanager
def trusting(trust: bool) -> Iterator[None]:
    """Inside: checkpoints of runs made on this machine may hold pickled objects."""
    token = _TRUST.set(bool(trust))
    try:
        yield
    finally:
        _TRUST.reset(token)


def honours_trust(function: F) -> F:
    """Run ``function`` inside ``trusting(trust)``, ``trust`` being its own keyword (default False)."""
    signature = inspect.signature(function)

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        trust = signature.bind(*args, **kwargs).arguments.get("trust", False)
        with trusting(trust):
            return function(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
