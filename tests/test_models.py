import pytest
import torch

from pstage.core.errors import ConfigError
from pstage.core.tasks import label_task, mask_task
from pstage.models.classifier import Classifier, class_probs, create_classifier, head_task
from pstage.models.losses import balanced_weights, compute_loss


def test_multi_head_probabilities_are_the_product_of_heads():
    task = mask_task()
    model = create_classifier("resnet10t", task, "multi").eval()
    images = torch.randint(0, 255, (3, 32, 24, 3), dtype=torch.uint8)
    logits = model(images)
    assert {k: v.shape[1] for k, v in logits.items()} == {"mask": 3, "gender": 2, "age": 3}
    probs = class_probs(logits, task)
    assert probs.shape == (3, 18)
    assert torch.allclose(probs.sum(1), torch.ones(3), atol=1e-5)
    m, g, a = (logits[h].softmax(-1) for h in ("mask", "gender", "age"))
    label = 2 * 6 + 1 * 3 + 0  # not_wear / female / <30
    assert torch.allclose(probs[:, label], m[:, 2] * g[:, 1] * a[:, 0])


def test_linear_head_and_gem_pooling():
    task = mask_task()
    model = create_classifier("resnet10t", task, "linear", pool="gem").eval()
    probs = class_probs(model(torch.zeros(2, 32, 24, 3, dtype=torch.uint8)), head_task(task, "linear"))
    assert probs.shape == (2, 18)
    assert any(name.endswith("pool.p") for name, _ in model.named_parameters())


def test_uint8_input_is_normalised_inside():
    model = Classifier("resnet10t", {"label": 2}).eval()
    images = torch.randint(0, 255, (2, 32, 24, 3), dtype=torch.uint8)
    x = model.normalize(images)
    assert x.shape == (2, 3, 32, 24) and x.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(model(images)["label"], model(x)["label"], atol=1e-5)


def test_too_small_input_is_a_config_error():
    with pytest.raises(
        ConfigError, match=r"model.name=convnext_atto cannot take data.image_size=\[16, 12\].*use a larger image size"
    ):
        create_classifier("convnext_atto", mask_task(), input_size=(16, 12))


def test_errors_name_the_problem():
    with pytest.raises(ConfigError, match="timm has no model 'resnet19'; did you mean"):
        create_classifier("resnet19", mask_task())
    with pytest.raises(ConfigError, match="model.head=multi needs a task with sub-tasks"):
        create_classifier("resnet10t", label_task(["a", "b"]), "multi")


@pytest.mark.parametrize("name", ["ce", "focal", "f1"])
def test_losses_decrease_towards_the_target(name):
    targets = torch.nn.functional.one_hot(torch.tensor([0, 1, 2, 1]), 3).float()
    right = compute_loss(name, targets * 6, targets)
    wrong = compute_loss(name, (1 - targets) * 6, targets)
    assert right < wrong
    assert torch.isfinite(compute_loss(name, torch.zeros(4, 3), targets * 0.7 + 0.1))


def test_label_smoothing_and_weights_change_the_loss():
    targets = torch.nn.functional.one_hot(torch.tensor([0, 1]), 3).float()
    logits = torch.tensor([[3.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    assert compute_loss("ce", logits, targets, label_smoothing=0.1) > compute_loss("ce", logits, targets)
    weights = balanced_weights(torch.tensor([0, 0, 0, 1]), 3)
    assert weights[1] > weights[0] and weights.mean() == pytest.approx(1.0)


@pytest.mark.parametrize("name", ["mobilenetv3_small_050", "convnext_atto"])
def test_heads_fit_backbones_with_pre_logits(name):
    """MobileNetV3 & co. output head_hidden_size features, not num_features: heads must fit either."""
    for pool in ("avg", "gem"):
        model = create_classifier(name, mask_task(), "multi", pool=pool, input_size=(64, 48)).eval()
        logits = model(torch.zeros(2, 64, 48, 3, dtype=torch.uint8))
        assert logits["mask"].shape == (2, 3)
