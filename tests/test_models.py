"""Model registry: BackdoorBench key compatibility, features/head split, state_dict loading."""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision

from bdsafety.models import (
    MODEL_NAMES,
    build_model,
    classifier_layer,
    identify_model,
    infer_num_classes,
    load_state_dict_compat,
)

pytestmark = pytest.mark.usefixtures("one_thread")

# the models built with real weights here (every registered name is checked on the meta device in test_model_zoo.py)
CORE = ("preactresnet18", "resnet18", "resnet18_cifar", "vgg19_bn", "preactresnet18_narrow", "cnn_small", "cnn_tiny")

_FIXTURE = "backdoorbench_state_dict_keys.json"
_FIXTURE_DIRS = [Path(__file__).parent / "fixtures"]


def _fixture() -> dict:
    for d in _FIXTURE_DIRS:
        if (d / _FIXTURE).is_file():
            return json.loads((d / _FIXTURE).read_text())["models"]
    raise FileNotFoundError(f"{_FIXTURE} not found in {[str(d) for d in _FIXTURE_DIRS]}; copy it to tests/fixtures/")


@lru_cache(maxsize=None)
def _built(name: str) -> torch.nn.Module:
    """One eval-mode model per name at 10 classes, with non-trivial BN statistics (never mutate it)."""
    torch.manual_seed(0)
    model = build_model(name, 10)
    _randomize_bn(model)
    return model.eval()


def _randomize_bn(model: torch.nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)


@pytest.mark.parametrize("name", ["preactresnet18", "resnet18", "vgg19_bn"])
def test_state_dict_matches_backdoorbench_fixture(name):
    with torch.device("meta"):  # same constructor, no memory or init cost
        model = build_model(name, 10)
    got = [[k, list(v.shape), str(v.dtype).removeprefix("torch.")] for k, v in model.state_dict().items()]
    assert got == _fixture()[name]


def test_preactresnet18_param_count():
    assert sum(p.numel() for p in build_model("preactresnet18", 10).parameters()) == 11_171_146


def test_resnet18_cifar_key_layout():
    keys = list(build_model("resnet18_cifar", 10).state_dict())
    assert keys[:2] == ["conv1.weight", "bn1.weight"]
    assert "layer2.0.shortcut.0.weight" in keys and "layer2.0.shortcut.1.running_var" in keys
    assert "layer1.0.shortcut.0.weight" not in keys  # identity shortcut has no parameters
    assert keys[-2:] == ["linear.weight", "linear.bias"]
    assert len(keys) == 122


def test_narrow_preact_has_preact_keys_with_quarter_width():
    full = build_model("preactresnet18", 10).state_dict()
    narrow = build_model("preactresnet18_narrow", 10).state_dict()
    assert list(full) == list(narrow)
    assert narrow["conv1.weight"].shape == (16, 3, 3, 3) and narrow["linear.weight"].shape == (10, 128)


def test_cnn_small_is_small_with_bn_and_4x4_features():
    model = build_model("cnn_small", 10).eval()
    assert sum(p.numel() for p in model.parameters()) == 391_466
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) == 4
    assert model.features(torch.zeros(1, 3, 32, 32)).shape[1:] == (256, 4, 4)


@pytest.mark.parametrize("size", [32, 64])
@pytest.mark.parametrize("name", CORE)
def test_features_head_split_is_exact(name, size):
    model = _built(name)
    n = 1 if name in ("vgg19_bn", "resnet18") else 2
    x = torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(size))
    with torch.no_grad():
        z = model.features(x)
        logits = model(x)
        assert z.ndim == 4 and z.shape[:2] == (n, model.feature_channels)
        assert torch.equal(model.head(z), logits)
    assert logits.shape == (n, 10)


@pytest.mark.parametrize("name", CORE)
def test_classifier_layer_is_the_final_linear(name):
    model = _built(name)
    layer = classifier_layer(model)
    assert isinstance(layer, torch.nn.Linear) and layer.out_features == 10
    seen = []
    handle = layer.register_forward_hook(lambda m, i, o: seen.append(o))
    try:
        with torch.no_grad():
            out = model(torch.randn(1, 3, 32, 32))
    finally:
        handle.remove()
    assert len(seen) == 1 and torch.equal(seen[0], out)


@pytest.mark.parametrize("name,factory", [("resnet18", torchvision.models.resnet18),
                                          ("vgg19_bn", torchvision.models.vgg19_bn)])
def test_torchvision_models_are_unmodified(name, factory):
    ours = _built(name)
    with torch.device("meta"):  # skip torchvision's weight init: the weights are assigned from ours
        ref = factory(num_classes=10)
    ref.load_state_dict(ours.state_dict(), assign=True)
    ref.eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(ours(x), ref(x))


def _bn(sd, p, x):
    return F.batch_norm(x, sd[p + ".running_mean"], sd[p + ".running_var"], sd[p + ".weight"], sd[p + ".bias"])


def _preact_reference(sd, x):
    """BackdoorBench's PreActResNet-18 forward written out on the state_dict: pre-activation blocks whose
    projection shortcut reads relu(bn1(x)), no final BN, global average pool, linear."""
    out = F.conv2d(x, sd["conv1.weight"], padding=1)
    for stage, stride in zip(range(1, 5), (1, 2, 2, 2)):
        for b in (0, 1):
            p = f"layer{stage}.{b}"
            s = stride if b == 0 else 1
            pre = F.relu(_bn(sd, p + ".bn1", out))
            skip = F.conv2d(pre, sd[p + ".shortcut.0.weight"], stride=s) if p + ".shortcut.0.weight" in sd else out
            h = F.conv2d(pre, sd[p + ".conv1.weight"], stride=s, padding=1)
            h = F.conv2d(F.relu(_bn(sd, p + ".bn2", h)), sd[p + ".conv2.weight"], padding=1)
            out = h + skip
    return F.linear(out.mean((2, 3)), sd["linear.weight"], sd["linear.bias"])


def _cifar_resnet_reference(sd, x):
    """The paper's CIFAR ResNet-18 forward on the state_dict (post-activation, BN'd 1x1 shortcut, 4x4 avg pool)."""
    out = F.relu(_bn(sd, "bn1", F.conv2d(x, sd["conv1.weight"], padding=1)))
    for stage, stride in zip(range(1, 5), (1, 2, 2, 2)):
        for b in (0, 1):
            p = f"layer{stage}.{b}"
            s = stride if b == 0 else 1
            h = F.relu(_bn(sd, p + ".bn1", F.conv2d(out, sd[p + ".conv1.weight"], stride=s, padding=1)))
            h = _bn(sd, p + ".bn2", F.conv2d(h, sd[p + ".conv2.weight"], padding=1))
            if p + ".shortcut.0.weight" in sd:
                skip = _bn(sd, p + ".shortcut.1", F.conv2d(out, sd[p + ".shortcut.0.weight"], stride=s))
            else:
                skip = out
            out = F.relu(h + skip)
    return F.linear(F.avg_pool2d(out, 4).flatten(1), sd["linear.weight"], sd["linear.bias"])


@pytest.mark.parametrize("name,reference", [("preactresnet18", _preact_reference),
                                            ("preactresnet18_narrow", _preact_reference),
                                            ("resnet18_cifar", _cifar_resnet_reference)])
def test_forward_matches_reference_computation(name, reference):
    model = _built(name)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(model.state_dict(), x), rtol=1e-4, atol=1e-5)


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="unknown model 'resnet19'") as err:
        build_model("resnet19", 10)
    assert "did you mean 'resnet18'" in str(err.value)
    assert all(n in str(err.value) for n in MODEL_NAMES)


@pytest.mark.parametrize(
    "kwargs", [{"num_classes": 0}, {"num_classes": 10.0}, {"num_classes": 10, "img_size": (32, 32)}]
)
def test_bad_arguments_rejected(kwargs):
    with pytest.raises(ValueError):
        build_model("cnn_small", **kwargs)


@pytest.mark.parametrize("name", ["preactresnet18_narrow", "resnet18_cifar", "cnn_small", "cnn_tiny"])
def test_num_classes_and_channels_respected(name):
    model = build_model(name, 43, img_size=(32, 32, 1)).eval()
    assert classifier_layer(model).out_features == 43
    assert infer_num_classes(model.state_dict()) == 43
    with torch.no_grad():
        assert model(torch.randn(2, 1, 32, 32)).shape == (2, 43)


@pytest.mark.parametrize("name", ["preactresnet18", "resnet18", "vgg19_bn"])
def test_infer_num_classes_big_models(name):
    with torch.device("meta"):
        assert infer_num_classes(build_model(name, 200).state_dict()) == 200


def test_identify_model_tells_every_registered_model_apart():
    for name in MODEL_NAMES:
        with torch.device("meta"):
            sd = build_model(name, 200, (64, 64, 3) if name == "alexnet" else (75, 75, 3)).state_dict()
        assert identify_model(sd) == [name]


def test_module_prefix_is_stripped_and_weights_loaded():
    src = _built("preactresnet18_narrow")
    wrapped = {"module." + k: v for k, v in src.state_dict().items()}
    dst = load_state_dict_compat(build_model("preactresnet18_narrow", 10), wrapped).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(dst(x), src(x))


def test_key_mismatch_names_matching_model():
    cifar_sd = build_model("resnet18_cifar", 10).state_dict()
    with pytest.raises(ValueError) as err:
        load_state_dict_compat(build_model("resnet18", 10), cifar_sd)
    msg = str(err.value)
    assert "this state_dict looks like 'resnet18_cifar'" in msg.lower()
    assert "missing keys" in msg and "unexpected keys" in msg
    assert "build_model('resnet18_cifar', 10)" in msg


def test_shape_mismatch_names_width_and_class_count():
    narrow_43 = build_model("preactresnet18_narrow", 43).state_dict()
    with pytest.raises(ValueError) as err:
        load_state_dict_compat(build_model("preactresnet18", 10), narrow_43)
    msg = str(err.value)
    assert "shape mismatches" in msg and "missing keys" not in msg
    assert "build_model('preactresnet18_narrow', 43)" in msg


def test_unknown_architecture_says_no_match():
    with pytest.raises(ValueError, match="matches no registered model"):
        load_state_dict_compat(build_model("cnn_small", 10), {"foo.weight": torch.zeros(3, 4)})


def test_result_dict_instead_of_state_dict_explains_fix():
    result = {"model_name": "cnn_small", "num_classes": 10, "model": build_model("cnn_small", 10).state_dict()}
    with pytest.raises(TypeError, match=r"\['model'\]"):
        load_state_dict_compat(build_model("cnn_small", 10), result)
