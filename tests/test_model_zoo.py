"""Every BackdoorBench architecture: keys against the model-zoo fixture (meta device), the key variants real records
hold, the features()/head() split per family, bad input, --pretrained and on-device upscaling."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torchvision

from bdsafety.errors import ConfigError, DataError
from bdsafety.models import build_model, classifier_layer, identify_model, load_state_dict_compat
from bdsafety.models.registry import VIT_MLP_RENAMES
from bdsafety.models.zoo import UNBUILDABLE, ZOO, BackdoorBenchViT

pytestmark = pytest.mark.usefixtures("one_thread")


_FIXTURE = "backdoorbench_model_zoo_keys.json"
_DIRS = [Path(__file__).parent / "fixtures"]


def _zoo_fixture() -> dict:
    for d in _DIRS:
        if (d / _FIXTURE).is_file():
            return json.loads((d / _FIXTURE).read_text())["models"]
    raise FileNotFoundError(f"{_FIXTURE} not found in {[str(d) for d in _DIRS]}: "
                            f"the repository's tests/fixtures/ is incomplete")


def _fixture_names() -> list[str]:
    for d in _DIRS:
        if (d / _FIXTURE).is_file():
            return list(json.loads((d / _FIXTURE).read_text())["models"])
    return list(ZOO) + ["preactresnet18"]


def _renamed(key: str) -> str:
    for old, new in VIT_MLP_RENAMES.items():
        key = key.replace(old, new)
    return key


def _size_failure(setting: dict) -> bool:
    """The fixture says BackdoorBench cannot run this architecture at this image size (not: other reasons)."""
    return not setting.get("record_producible", True) and "at this size: fails" in setting.get("why_not_producible", "")


@pytest.mark.parametrize("name", _fixture_names())
def test_state_dict_identical_to_backdoorbench(name):
    """Keys, shapes, dtypes and order of every fixture architecture at 10 and 200 classes (built on the meta device);
    sizes BackdoorBench cannot run are refused before training and work with model_input_size."""
    spec = _zoo_fixture()[name]
    if spec.get("instantiable") is False:
        with pytest.raises(ConfigError, match="cannot be used"):
            build_model(name, 10)
        assert name in UNBUILDABLE
        return
    for setting in spec["settings"].values():
        img = tuple(setting["img_size"])
        input_size = None
        if _size_failure(setting):
            with pytest.raises(ConfigError, match=f"cannot take {img[0]}x{img[1]} inputs.*model_input_size"):
                build_model(name, setting["num_classes"], img)
            input_size = 224
        with torch.device("meta"):
            model = build_model(name, setting["num_classes"], img, input_size=input_size)
        got = [[k, list(v.shape), str(v.dtype).removeprefix("torch.")] for k, v in model.state_dict().items()]
        want = [[_renamed(k), shape, dtype] for k, shape, dtype in setting["state_dict"]]
        assert got == want
        assert sum(p.numel() for p in model.parameters()) == setting["n_params"]
        head = spec["fp_defense_pruned_linear"]
        if head is not None:  # the layer BackdoorBench's fine-pruning masks exists under that name
            assert isinstance(model.get_submodule(head), torch.nn.Linear)


@pytest.mark.slow
def test_record_key_variants_load_strictly_on_meta():
    """module. prefix (DataParallel), fine-pruning weight_orig/weight_mask, ViT MLP names of torchvision 0.12 and a
    ViT saved without the Resize wrapper: all load strictly into the same architecture (keys checked on meta)."""
    fx = _zoo_fixture()
    for name in ("vit_b_16", "resnet50", "mobilenet_v3_large", "densenet121"):
        setting = fx[name]["settings"]["cifar10_32"]
        sd = {k: torch.empty(shape, dtype=getattr(torch, dt), device="meta") for k, shape, dt in setting["state_dict"]}
        pruned = fx[name]["fp_defense_pruned_linear"]
        if pruned:  # defense/fp.py's layout: ..., bias, weight_orig, weight_mask
            w = sd.pop(pruned + ".weight")
            sd[pruned + ".weight_orig"], sd[pruned + ".weight_mask"] = w, torch.empty_like(w)
        variants = [sd, {"module." + k: v for k, v in sd.items()}]
        if name.startswith("vit"):
            variants.append({k[2:]: v for k, v in sd.items()})  # unwrapped: no '1.'
        for variant in variants:
            with torch.device("meta"):
                model = build_model(name, 10)
            load_state_dict_compat(model, variant)
            assert identify_model(variant) == [name]


def test_fine_pruning_mask_is_folded_into_the_weight():
    torch.manual_seed(0)
    model = build_model("preactresnet18_narrow", 10)
    sd = model.state_dict()
    w = sd.pop("linear.weight")
    mask = (torch.rand_like(w) > 0.5).float()
    sd["linear.weight_orig"], sd["linear.weight_mask"] = w + 1.0, mask
    fresh = load_state_dict_compat(build_model("preactresnet18_narrow", 10), sd)
    assert torch.equal(fresh.linear.weight, (w + 1.0) * mask)
    assert (fresh.linear.weight == 0).sum() == (mask == 0).sum()


def _tiny_vit(num_classes: int = 5) -> BackdoorBenchViT:
    torch.manual_seed(0)
    vit = torchvision.models.VisionTransformer(image_size=32, patch_size=16, num_layers=1, num_heads=2, hidden_dim=8,
                                               mlp_dim=16, num_classes=num_classes)
    return BackdoorBenchViT("vit_tiny", vit).eval()


def test_vit_old_mlp_names_and_features_head():
    """torchvision-0.12 MLP names land in the same tensors; features = the class token as (N, D, 1, 1); forward ==
    torchvision's ViT on the input resized to its image size, as BackdoorBench's Resize wrapper computes it."""
    model = _tiny_vit()
    sd = model.state_dict()
    old = {k.replace(".mlp.0.", ".mlp.linear_1.").replace(".mlp.3.", ".mlp.linear_2."): v + 1 for k, v in sd.items()}
    assert any(".mlp.linear_1." in k for k in old)
    fresh = _tiny_vit()
    load_state_dict_compat(fresh, old)
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, sd[k] + 1), k
    x = torch.rand(2, 3, 20, 20)
    with torch.no_grad():
        z = fresh.features(x)
        assert z.shape == (2, 8, 1, 1) and fresh.feature_channels == 8
        ref = fresh._modules["1"](torch.nn.functional.interpolate(x, size=(32, 32), mode="bilinear",
                                                                  align_corners=False))
        torch.testing.assert_close(fresh.head(z), ref)
        torch.testing.assert_close(fresh(x), ref)
    assert classifier_layer(fresh) is fresh._modules["1"].heads.head


# one small member per family (resnet and vgg: tests/test_models.py), at a size the family takes
_FAMILY_MEMBERS = [("alexnet", 64), ("squeezenet1_0", 32), ("densenet121", 32), ("inception_v3", 75), ("googlenet", 32),
                   ("shufflenet_v2_x1_0", 32), ("mobilenet_v2", 32), ("mobilenet_v3_large", 32), ("mnasnet1_0", 32),
                   ("efficientnet_b0", 32), ("convnext_tiny", 32)]


@pytest.mark.parametrize("name,size", _FAMILY_MEMBERS)
def test_features_head_equal_torchvision_forward(name, size):
    """head(features(x)) is torchvision's own eval forward with the same weights; features is a 4-D map with
    feature_channels channels; the classifier is the layer that produces the logits."""
    torch.manual_seed(0)
    ours = build_model(name, 7, (size, size, 3)).eval()
    with torch.device("meta"):
        ref = getattr(torchvision.models, ZOO[name][0])(num_classes=7, **ZOO[name][2])
    ref.load_state_dict(ours.state_dict(), assign=True)
    ref.eval()
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        z = ours.features(x)
        assert z.ndim == 4 and z.shape[:2] == (2, ours.feature_channels)
        assert torch.equal(ours.head(z), ours(x))
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-4, atol=1e-5)
    layer = classifier_layer(ours)
    assert layer.weight.shape[0] == 7
    seen = []
    handle = layer.register_forward_hook(lambda m, i, o: seen.append(o))
    ours.train()  # train mode: still plain logits (the aux heads of inception_v3 / googlenet are not used)
    out = ours(x)
    handle.remove()
    assert isinstance(out, torch.Tensor) and out.shape == (2, 7) and len(seen) == 1


# ------------------------------------------------------------------------------------------ bad input, pretrained, size
def test_record_of_unknown_architecture_names_the_closest():
    """A wide_resnet50_2 whose last stage was renamed matches nothing: the error names wide_resnet50_2 first (resnet50
    and resnext50_32x4d have the same key names; shapes break the tie) and the keys that differ."""
    with torch.device("meta"):
        sd = build_model("wide_resnet50_2", 10).state_dict()
        model = build_model("resnet50", 10)
    sd = {k.replace("layer4.", "stage4."): v for k, v in sd.items()}
    with pytest.raises(DataError) as err:
        load_state_dict_compat(model, sd)
    msg = str(err.value)
    assert "matches no registered model; closest: 'wide_resnet50_2' (260 of 320 keys shared" in msg
    assert "layer4.0.conv1.weight" in msg and "stage4.0.conv1.weight" in msg


def test_too_small_inputs_rejected_before_training_with_the_fix():
    with pytest.raises(ConfigError, match=r"alexnet cannot take 32x32 inputs.*63x63.*model_input_size to 63"):
        build_model("alexnet", 10, (32, 32, 3))
    with pytest.raises(ConfigError, match=r"inception_v3 cannot take 74x74 .*75x75"):
        build_model("inception_v3", 10, (74, 74, 3))
    with torch.device("meta"):
        build_model("inception_v3", 10, (75, 75, 3))
        build_model("alexnet", 10, (32, 32, 3), input_size=64)
    with pytest.raises(ConfigError, match="model_input_size works with BackdoorBench's torchvision"):
        build_model("preactresnet18", 10, input_size=64)
    with pytest.raises(ConfigError, match="16x16 patches: model_input_size must be a multiple of 16"):
        build_model("vit_b_16", 10, input_size=250)


def test_model_input_size_upsamples_on_the_device():
    """input_size=64 on 32x32 data == the same weights fed a bilinearly upsampled 64x64 batch."""
    torch.manual_seed(0)
    up = build_model("squeezenet1_0", 10, (32, 32, 3), input_size=64).eval()
    plain = build_model("squeezenet1_0", 10, (64, 64, 3)).eval()
    plain.load_state_dict(up.state_dict())
    x = torch.rand(2, 3, 32, 32)
    big = torch.nn.functional.interpolate(x, size=(64, 64), mode="bilinear", align_corners=False)
    with torch.no_grad():
        assert up.features(x).shape == plain.features(big).shape
        torch.testing.assert_close(up(x), plain(big))


def _imagenet_file(tmp_path, arch: str) -> tuple[Path, dict]:
    """A torchvision-layout 1000-class state_dict of ``arch`` with random weights, saved like a downloaded file."""
    torch.manual_seed(5)
    sd = getattr(torchvision.models, ZOO[arch][0])(num_classes=1000, **ZOO[arch][2]).state_dict()
    path = tmp_path / f"{arch}_imagenet.pth"
    torch.save(sd, path)
    return path, sd


def test_pretrained_file_loads_backbone_and_keeps_a_fresh_head(tmp_path):
    path, sd = _imagenet_file(tmp_path, "squeezenet1_0")
    torch.manual_seed(0)
    fresh = build_model("squeezenet1_0", 7)
    torch.manual_seed(0)
    model = build_model("squeezenet1_0", 7, pretrained=str(path))
    got = model.state_dict()
    for k, v in sd.items():
        if k.startswith("classifier."):  # the 1000-class head is not taken; the fresh 7-class one stays
            assert torch.equal(got[k], fresh.state_dict()[k]) and got[k].shape[0] == 7
        else:
            assert torch.equal(got[k], v), k


def test_pretrained_of_another_architecture_is_refused(tmp_path):
    path, _ = _imagenet_file(tmp_path, "squeezenet1_0")
    with pytest.raises(DataError) as err:
        build_model("mobilenet_v2", 10, pretrained=str(path))
    msg = str(err.value)
    assert f"--pretrained {path} does not fit mobilenet_v2" in msg
    assert "looks like 'squeezenet1_0' with 1000 classes" in msg


def test_pretrained_weights_name_from_the_local_torch_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cache = tmp_path / "torch" / "hub" / "checkpoints" / "squeezenet1_0-b66bff10.pth"
    with pytest.raises(ConfigError) as err:
        build_model("squeezenet1_0", 10, pretrained="SqueezeNet1_0_Weights.IMAGENET1K_V1")
    msg = str(err.value)
    assert str(cache) in msg and "https://download.pytorch.org/models/squeezenet1_0-b66bff10.pth" in msg
    assert "nothing is downloaded" in msg
    with pytest.raises(ConfigError, match=r"not a weights name.*DEFAULT, IMAGENET1K_V1"):
        build_model("squeezenet1_0", 10, pretrained="IMAGENET22K")
    path, sd = _imagenet_file(tmp_path, "squeezenet1_0")
    cache.parent.mkdir(parents=True)
    path.rename(cache)
    for name in ("DEFAULT", "IMAGENET1K_V1"):
        model = build_model("squeezenet1_0", 10, pretrained=name)
        assert torch.equal(model.state_dict()["features.0.weight"], sd["features.0.weight"])


def _fake_weights(setting: dict) -> dict:
    """The fixture's state_dict as stride-0 views of one zero each: real tensors with every key, shape and dtype, a few
    bytes on disk whatever the architecture's size."""
    return {k: torch.zeros((), dtype=getattr(torch, dtype)).expand(shape) for k, shape, dtype in setting["state_dict"]}


@pytest.mark.parametrize("name", _fixture_names())
def test_inspector_reads_a_record_of_every_architecture(name, tmp_path, monkeypatch, capsys):
    """A BackdoorBench-layout record of every buildable fixture architecture (each image size BackdoorBench can run,
    else its data at 32 px with model_input_size 224, as this project's records store it): the inspector names the
    architecture, loads the weights strictly and exits 0. The model is built on the meta device, so ViT-L costs no
    memory; the keys and shapes are the fixture's."""
    import bdsafety.models as models
    from bdsafety.inspector import main as inspect
    from tests.bb_records import make_bb_v22_record

    spec = _zoo_fixture()[name]
    if spec.get("instantiable") is False:
        pytest.skip(f"BackdoorBench cannot build {name}: no record of it can exist")
    real_build = models.build_model

    def meta_build(*a, **k):
        with torch.device("meta"):
            return real_build(*a, **k)

    monkeypatch.setattr(models, "build_model", meta_build)
    for sname, setting in spec["settings"].items():
        img = tuple(setting["img_size"])
        input_size = None if setting.get("record_producible", True) else 224
        if input_size is not None and not _size_failure(setting):
            continue
        rec = make_bb_v22_record(tmp_path / sname, name, n_train=12, n_test=6, num_classes=setting["num_classes"],
                                 img_size=(img[0], img[1], img[2]), model_name=name).record_dir
        result = torch.load(rec / "attack_result.pt", weights_only=False)
        result["model"] = _fake_weights(setting)
        torch.save(result, rec / "attack_result.pt")
        if input_size is not None:
            info = torch.load(rec / "info.pickle", weights_only=False)
            torch.save({**info, "model_input_size": input_size}, rec / "info.pickle")
        assert (rec / "attack_result.pt").stat().st_size < 2_000_000
        with pytest.warns(UserWarning, match="meta"):  # copying into meta parameters: a no-op that checks shapes
            assert inspect([str(rec)]) == 0, (name, sname)
        out = capsys.readouterr().out
        assert f"architecture  weights fit {name} ({len(setting['state_dict'])} tensors" in out, out


def test_vit_input_size_sets_the_positional_embedding_only():
    with torch.device("meta"):
        small, full = build_model("vit_b_16", 10, input_size=32), build_model("vit_b_16", 10)
    s, f = small.state_dict(), full.state_dict()
    assert list(s) == list(f)
    assert [k for k in s if s[k].shape != f[k].shape] == ["1.encoder.pos_embedding"]
    assert tuple(s["1.encoder.pos_embedding"].shape) == (1, 5, 768) and small.input_size == 32
    assert identify_model(s, 32) == ["vit_b_16"] and identify_model(s) == []
    with pytest.raises(ConfigError, match="multiple of 16"):
        build_model("vit_b_16", 10, input_size=40)
