"""Loading a fold model from its Lightning checkpoint (inference, export, reports, distillation).

Checkpoints are read with ``torch.load(weights_only=True)``: tensors and plain containers only,
so a checkpoint from a teammate (the team store) cannot run code on the machine that reads it.
pstage's own checkpoints always fit that: Lightning 2.x writes ``save_weights_only`` checkpoints
(best.ckpt, final/model.ckpt) as a dict of the state_dict (an OrderedDict of tensors), loop
counters, its version string and ``hyper_parameters`` as a plain dict of the config and task
dicts, so no type needs allowlisting (``torch.serialization.safe_globals``). A checkpoint that
needs more (pickled objects) is refused with one line, unless the caller trusts it
(``--trust``, ``trust=True``) and its run was made on this machine: a run pulled from a store is
never trusted.
"""

from __future__ import annotations

import pickle
import re
import warnings
from pathlib import Path
from typing import Any

import pstage.core.compat  # noqa: F401

import torch
from pydantic import ValidationError

from pstage.core.errors import RunError
from pstage.models.module import ClassifierModule
from pstage.models.trust import trusted
from pstage.runs.rundir import PULLED

# torch's refusal names the first global the safe loader would not build (exec, os.system, a class)
_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")
_DETAIL = re.compile(r"WeightsUnpickler error:\s*([^\n]+)")


def pulled_from_store(checkpoint: str | Path) -> bool:
    """Whether the checkpoint's run (``<run>/fold_k/best.ckpt``, ``<run>/final/*.ckpt``) came from a team store."""
    path = Path(checkpoint).absolute()
    return any((folder / PULLED).is_file() for folder in (path.parent, path.parent.parent))


def read_checkpoint(checkpoint: str | Path, trust: bool | None = None) -> dict[str, Any]:
    """A checkpoint's contents, read without running code (see the module docstring for ``trust``)."""
    trust = trusted() if trust is None else trust
    try:
        try:
            with warnings.catch_warnings():  # torch warns about pickle protocols before it refuses
                warnings.simplefilter("ignore")
                state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            found = _GLOBAL.search(str(exc))
            if found is None:  # not refused objects: a broken or foreign file
                detail = _DETAIL.search(str(exc))
                raise RunError(
                    f"{checkpoint}: unreadable checkpoint ({detail.group(1) if detail else 'not a torch checkpoint'})"
                ) from None
            what = f"a pickled {found.group(1)}"
            if pulled_from_store(checkpoint):
                raise RunError(
                    f"{checkpoint}: holds {what}, which could run code when loaded, and its run was pulled "
                    "from a team store, so it is never loaded (--trust is only for runs made on this machine); "
                    "ask its owner to re-train and publish it with pstage"
                ) from None
            if not trust:
                raise RunError(
                    f"{checkpoint}: holds {what}, which could run code when loaded (pstage's checkpoints hold "
                    "only tensors); if you made this run yourself, pass --trust (trust=True in the API)"
                ) from None
            state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError, AttributeError, ImportError) as exc:
        raise RunError(f"{checkpoint}: unreadable checkpoint ({str(exc).splitlines()[0][:200]})") from None
    if not isinstance(state, dict):
        raise RunError(f"{checkpoint}: not a Lightning checkpoint (a {type(state).__name__})")
    return state


def load_fold_module(checkpoint: str | Path, *, trust: bool | None = None) -> ClassifierModule:
    """A fold model from its checkpoint, in eval mode on the CPU.

    Built from the checkpoint's own config with ``pretrained`` off and no ``weights`` file: the
    weights come from the checkpoint, so nothing is downloaded or read from elsewhere. ``trust``
    (default: the command's ``--trust``, models/trust.py) lets a local run's checkpoint hold pickled objects.
    """
    state = read_checkpoint(checkpoint, trust)
    hparams = state.get("hyper_parameters")
    weights = state.get("state_dict")
    if not isinstance(hparams, dict) or not isinstance(hparams.get("config"), dict) or not isinstance(weights, dict):
        raise RunError(f"{checkpoint}: not a pstage fold checkpoint (no hyper_parameters.config or state_dict)")
    config = dict(hparams["config"])
    config["model"] = {**(config.get("model") or {}), "pretrained": False, "weights": None}
    try:
        module = ClassifierModule(config, hparams.get("task") or {})
        module.load_state_dict(weights)
    except (ValidationError, ValueError, KeyError, TypeError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise RunError(f"{checkpoint}: its model cannot be rebuilt ({first})") from None
    return module.eval()
