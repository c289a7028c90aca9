"""Identity embeddings (persons.embedding): the packaged face model is found, sees one person through
drawn masks, is cached row by row, and ``auto`` falls back to the fold features in one line."""

from __future__ import annotations

from pathlib import Path

import cv2
import matplotlib.cbook
import numpy as np
import pytest

from pstage.config import Config, DataConfig, load_config
from pstage.core.errors import ConfigError
from pstage.core.tasks import mask_label, mask_task
from pstage.data import identity
from pstage.data.cache import decode
from pstage.data.faces import locate
from pstage.data.sources import load_source
from pstage.demo.synthetic import make_demo_data
from pstage.inference import persons
from pstage.training.recipes import check_recipes

TASK = mask_task()
STATES = [0, 0, 0, 0, 0, 1, 2]  # mask1..5, incorrect, normal

pytestmark = pytest.mark.skipif(
    identity.face_model_missing("dlib_resnet") is not None, reason="face-recognition-models is not installed"
)


def _masked_photos(out: Path, seed: int = 0) -> list[str]:
    """A real face (Grace Hopper, public domain, shipped in matplotlib's sample data) as one 'person':
    5 photos with a mask drawn over nose and mouth, 1 under the nose, 1 without, each pasted at its
    own place and scale on its own background."""
    face = decode(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))
    found = locate("retinaface", face)
    assert found is not None
    (lx, ly), (rx, ry), (nx, ny) = found[4:10].reshape(3, 2)
    width = rx - lx
    rng = np.random.default_rng(seed)
    paths = []
    for k, state in enumerate(STATES):
        photo = face.copy()
        if state < 2:
            top = (ly + ny) / 2 if state == 0 else ny + 0.25 * width  # over the nose, or under it
            bottom = ny + 1.6 * width
            colour = tuple(int(c) for c in rng.integers(30, 250, 3))
            corners = [
                (lx - 0.6 * width, top),
                (rx + 0.6 * width, top),
                (rx + 0.4 * width, bottom),
                (lx - 0.4 * width, bottom),
            ]
            cv2.fillPoly(photo, [np.int32(corners)], colour)
        scale = rng.uniform(0.45, 0.7)
        small = cv2.resize(photo, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
        canvas = np.full((512, 384, 3), rng.integers(40, 220, 3), np.uint8)
        h, w = small.shape[:2]
        y, x = rng.integers(0, 512 - h), rng.integers(0, 384 - w)
        canvas[y : y + h, x : x + w] = small
        path = out / f"grace_{k}.jpg"
        cv2.imwrite(str(path), cv2.cvtColor(canvas, cv2.COLOR_RGB2BGR))
        paths.append(str(path))
    return paths


@pytest.fixture(scope="module")
def crowd(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Grace's 7 photos among 10 generated persons' 70 (drawn faces, 192x256): paths, person ids, mask states."""
    root = tmp_path_factory.mktemp("identity")
    demo = make_demo_data(root / "demo", persons=10, eval_persons=1, image_size=(256, 192), seed=3, workers=1)
    others = sorted(str(p) for p in (demo / "train" / "images").glob("*/*.jpg"))
    states = [2 if "normal" in p else 1 if "incorrect" in p else 0 for p in others]
    people = [Path(p).parent.name for p in others]
    paths = _masked_photos(root) + others
    return paths, np.array(["grace"] * 7 + people), np.array(STATES + states)


def test_dlib_network_is_read_from_the_package_in_torch():
    """The 29 convolutions and the 128-D projection of dlib's file, run by torch (no dlib)."""
    layers = identity.read_dlib_resnet(identity._weights_file())
    assert len(layers["convs"]) == 29 and layers["fc"][0].shape == (256, 128)
    assert layers["mean"] == pytest.approx([122.782, 117.001, 104.298], abs=1e-3)  # dlib's input means
    chips = np.random.default_rng(0).integers(0, 256, (2, identity.CHIP, identity.CHIP, 3), dtype=np.uint8)
    out = identity.get_face_model("dlib_resnet").embed(chips)
    assert out.shape == (2, 128) and np.isfinite(out).all() and not np.allclose(out[0], out[1])


def test_one_person_through_masks_groups_alone(crowd, tmp_path, monkeypatch):
    """Grace's masked, half-masked and bare photos form one group that no generated person joins;
    ``pstage predict``'s path (group_test, centred as training recorded) does the same. Without the
    greyed lower face (the control) her masked photos drift apart, past the generated persons."""
    paths, people, states = crowd
    config = Config().model_copy(update={"data": Config().data.model_copy(update={"cache_dir": str(tmp_path)})})
    features, centre, computed = persons.face_features(paths, None, config, "dlib_resnet")
    assert computed == len(paths) and features.shape == (len(paths), 128)
    grace = people == "grace"
    distance = 1 - features @ features.T
    nearest_other = distance[grace][:, ~grace].min()
    assert distance[grace][:, grace].max() < nearest_other, (distance[grace][:, grace].max(), nearest_other)
    monkeypatch.setattr(identity, "MASK_ROW", identity.CHIP)  # the control: the whole face, masks in view
    bare, _, _ = persons.face_features(paths[:7], None, config, "dlib_resnet", centre)
    assert (1 - bare @ bare.T).max() > distance[grace][:, grace].max() + 0.1
    monkeypatch.undo()

    probs = np.full((len(paths), 18), 0.01)
    probs[np.arange(len(paths)), mask_label(states, 0, 0)] = 1.0
    probs /= probs.sum(1, keepdims=True)
    groups = persons.group_photos(features, probs, TASK, threshold=0.5)
    assert len(set(groups[grace])) == 1 and (groups == groups[grace][0]).sum() == 7
    info = {"persons": {"applied": True, "embedding": "dlib_resnet", "threshold": 0.5, "centre": centre.tolist()}}
    pooled, again = persons.group_test(info, [], "", config, probs, TASK, paths)
    assert again is not None and (again == groups).all()
    masks = np.asarray(TASK.class_to_head["mask"])  # pooling shares gender/age, never moves the mask
    for k in range(3):
        np.testing.assert_allclose(pooled[:, masks == k].sum(1), probs[:, masks == k].sum(1), atol=1e-6)


def test_embeddings_are_cached_row_by_row(crowd, tmp_path):
    paths = crowd[0][:10]
    first, computed = identity.face_embeddings(paths, [0, 1, 2], cache_dir=tmp_path)
    assert computed == 3
    everything, computed = identity.face_embeddings(paths, cache_dir=tmp_path)
    assert computed == len(paths) - 3  # only the rows not cached yet
    np.testing.assert_array_equal(everything[:3], first)
    again, computed = identity.face_embeddings(paths, cache_dir=tmp_path)
    assert computed == 0 and np.array_equal(again, everything)
    assert len(list(tmp_path.glob("identity-*.npy"))) == 1 and not list(tmp_path.glob("*.tmp*"))


def test_auto_falls_back_to_fold_features_in_one_line(monkeypatch, capsys, demo_root):
    assert persons.resolve_embedding("auto") == "dlib_resnet"
    assert persons.resolve_embedding("fold") == "fold"
    monkeypatch.setattr(identity, "_weights_file", lambda: None)  # as without face-recognition-models
    assert persons.resolve_embedding("auto") == "fold"
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert len(lines) == 1 and "face-recognition-models is not installed" in lines[0], lines
    with pytest.raises(ConfigError, match="persons.embedding=dlib_resnet: face-recognition-models is not installed"):
        persons.resolve_embedding("dlib_resnet")
    # asked for by name, a missing face model is refused before any training, not after it
    source = load_source(DataConfig(path=str(demo_root)))
    with pytest.raises(ConfigError, match="persons.embedding=dlib_resnet"):
        check_recipes(load_config(overrides=["persons.embedding=dlib_resnet"]), source)
    check_recipes(load_config(overrides=["persons.embedding=dlib_resnet", "persons.group=off"]), source)
    check_recipes(load_config(), source)  # auto falls back instead
