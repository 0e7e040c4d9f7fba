"""Small members of the torchvision families through the real tools on tiny synthetic data: a record is read by the
inspector and loaded strictly, then FST (squeezenet's 1x1-conv head), one RA epoch and one PAM round of one epoch
(BTI-DBF trigger inversion through features()/head()). Large members are covered on the meta device by
tests/test_model_zoo.py."""
from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from bdsafety.models import build_model, classifier_layer, load_state_dict_compat
from bdsafety.safeio import safe_torch_load

ROOT = Path(__file__).resolve().parent.parent
CFG = ROOT / "config"
ATTACK_ARCH = "mobilenet_v3_large"  # trained by the attack; the others get random weights in a copy of its record
# the smallest member of every torchvision family BackdoorBench builds (resnet18, preactresnet18 and vgg19_bn run the
# tools in the other end-to-end tests); ViT-B/16 (86M parameters at 224 px) has its own test below
ARCHS = ["mobilenet_v3_large", "efficientnet_b0", "squeezenet1_0", "densenet121", "convnext_tiny", "mobilenet_v2",
         "shufflenet_v2_x1_0", "mnasnet1_0", "googlenet", "alexnet", "inception_v3"]
SIZED = {"alexnet": 64, "inception_v3": 80,  # too small at 32 px: upsampled on the device (model_input_size)
         # BackdoorBench's 224 minus the cost: 5 tokens instead of 197, same keys (pos_embedding shorter)
         "vit_b_16": 32}
TINY = ["--no_progress", "--ratio", "20", "--batch_size", "20", "--epochs", "1"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _random_weights_are_not_checked_for_divergence(monkeypatch):
    """The records hold random weights: in eval mode their BatchNorm statistics (init, or one step's) give losses of
    1e4..1e26 that say nothing about the tools. These tests check that every architecture runs through them; the
    divergence check itself is tested in tests/test_engine.py and tests/test_validation.py."""
    from bdsafety import engine

    monkeypatch.setattr(engine, "check_health", lambda *a, **k: None)


@pytest.fixture(scope="module")
def zoo_records(tmp_path_factory):
    """badnet (demo config, 1 epoch on 100 synthetic images) with mobilenet_v3_large, and copies of that record holding
    random weights of the other architectures (a record of that architecture with the fixture's keys)."""
    from bdsafety.registry import get

    root = tmp_path_factory.mktemp("zoo") / "record"
    get("attack", "badnet").main([
        "--yaml_path", str(CFG / "attack" / "badnet" / "demo.yaml"), "--record_root", str(root), "--save_folder_name",
        ATTACK_ARCH, "--model", ATTACK_ARCH, "--synthetic_n_train", "100", "--synthetic_n_test", "20", "--epochs", "1",
        "--batch_size", "50", "--no_progress"])
    for arch in ARCHS:
        if arch == ATTACK_ARCH:
            continue
        shutil.copytree(root / ATTACK_ARCH, root / arch, ignore=shutil.ignore_patterns("defense", "bti_inversion"))
        pt = root / arch / "attack_result.pt"
        result = safe_torch_load(pt)
        torch.manual_seed(1)
        result["model_name"], result["model"] = arch, build_model(arch, 10, input_size=SIZED.get(arch)).state_dict()
        torch.save(result, pt)
        if arch in SIZED:
            info = safe_torch_load(root / arch / "info.pickle")
            torch.save({**info, "model_input_size": SIZED[arch]}, root / arch / "info.pickle")
    return root


def _one(out) -> Path:
    """The output folder of a defense run (main returns it, or a one-element list of it)."""
    if isinstance(out, (list, tuple)):
        (out,) = out
    return Path(out)


def _rows(folder: Path, name: str) -> pd.DataFrame:
    return pd.read_csv(folder / f"{name}_df.csv", index_col=0, na_values=["nan_value"])


def _changed(before: dict, path: Path, arch: str) -> float:
    """Largest weight change between ``before`` and the model saved at ``path`` (loaded strictly into ``arch``)."""
    res = safe_torch_load(path)
    assert res["model_name"] == arch
    model = load_state_dict_compat(build_model(arch, 10, input_size=SIZED.get(arch)), res["model"])
    return max(float((v.float() - before[k].float()).abs().max()) for k, v in model.state_dict().items()
               if v.is_floating_point())


@pytest.mark.parametrize("arch", ARCHS)
def test_small_family_members_run_the_tools(zoo_records, arch, capsys):
    from bdsafety.inspector import main as inspect
    from bdsafety.records import load_attack_record
    from bdsafety.registry import get
    from bdsafety.retune.ra import main as ra

    rec = zoo_records / arch
    assert inspect([str(rec)]) == 0
    out = capsys.readouterr().out
    assert f"architecture  weights fit {arch}" in out
    start = load_state_dict_compat(build_model(arch, 10, input_size=SIZED.get(arch)),
                                   load_attack_record(rec).state_dict).state_dict()

    pam = _one(get("defense", "pam").main([
        "--result_file", str(rec), "--yaml_path", str(CFG / "defense" / "pam" / "demo.yaml"), "--n_rounds", "1",
        "--bti_pretrain_epochs", "1", "--bti_mask_epochs", "1", "--bti_gen_epochs", "1",
        "--bti_batch_size", "20", *TINY]))
    df = _rows(pam, "pam")
    assert list(df["epoch"]) == [0, 1] and df["test_acc"].notna().all()
    assert (pam / "bti_generator.pt").is_file() and (pam / "log" / "index.txt").is_file()
    assert _changed(start, pam / "defense_result.pt", arch) > 0
    defenses = ["pam"]

    # FST re-initialises and norm-constrains the classifier layer (squeezenet's is the 1x1 conv 'classifier.1')
    fst = _one(get("defense", "fst").main(["--result_file", str(rec), "--yaml_path",
                                           str(CFG / "defense" / "fst" / "demo.yaml"), *TINY]))
    info = yaml.safe_load((fst / "config.yaml").read_text())
    assert info["head_weight_norm_final"] == pytest.approx(info["head_weight_norm_original"], rel=1e-4)
    saved = safe_torch_load(fst / "defense_result.pt")["model"]
    assert _changed(start, fst / "defense_result.pt", arch) > 0
    if arch == "squeezenet1_0":
        assert not torch.equal(saved["classifier.1.weight"], start["classifier.1.weight"])
        assert isinstance(classifier_layer(build_model(arch, 10)), torch.nn.Conv2d)
    defenses.append("fst")

    outs = ra(["--result_file", str(rec), "--defense", ",".join(defenses), "--yaml_path",
               str(CFG / "retune_attack" / "ra" / "demo.yaml"), "--poison_num", "2", *TINY])
    assert len(outs) == len(defenses)
    for name, out in zip(defenses, outs):
        assert out == rec / "defense" / name / "ra"
        assert list(_rows(out, "ra")["epoch"]) == [0, 1]
        purified = load_state_dict_compat(build_model(arch, 10, input_size=SIZED.get(arch)),
                                          safe_torch_load(rec / "defense" / name / "defense_result.pt")["model"])
        assert _changed(purified.state_dict(), out / "ra_result.pt", arch) > 0


@pytest.mark.slow
def test_paper_protocol_cifar100_pretrained_resnet18(tmp_path):
    """config/attack/badnet/cifar100_paper.yaml with a locally generated ImageNet-layout ResNet-18 file on tiny fake
    CIFAR-100 (sizes overridden: 1 epoch, input_resize 64 / input_crop 56 instead of 224 / 224); then a defense rebuilds
    the record's model with the record's input pipeline, normalisation and the loaded weights."""
    import torchvision

    from bdsafety.config import resolve
    from bdsafety.data.device import InputGeometry
    from bdsafety.experiment import RECORD_SCHEMA, open_experiment
    from bdsafety.registry import get
    from tests.fake_datasets import make_fake_cifar100

    data = tmp_path / "data"
    make_fake_cifar100(str(data / "cifar100"), n_train=40, n_test=10)
    torch.manual_seed(3)
    imagenet = torchvision.models.resnet18(num_classes=1000).state_dict()
    weights = tmp_path / "resnet18-imagenet.pth"
    torch.save(imagenet, weights)
    root = tmp_path / "record"
    rec = get("attack", "badnet").main([
        "--yaml_path", str(CFG / "attack" / "badnet" / "cifar100_paper.yaml"), "--dataset_path", str(data),
        "--record_root", str(root), "--save_folder_name", "paper", "--pretrained", str(weights), "--input_resize", "64",
        "--input_crop", "56",
        "--epochs", "1", "--batch_size", "20", "--eval_batch_size", "64", "--device", "cpu", "--no_progress"])
    rec = Path(rec)
    record = safe_torch_load(rec / "attack_result.pt")
    info = safe_torch_load(rec / "info.pickle")
    assert record["model_name"] == "resnet18" and record["num_classes"] == 100
    assert info["input_resize"] == 64 and info["input_crop"] == 56 and info["normalization"] == "imagenet"
    assert info["pretrained"] == str(weights) and info["lr"] == 0.001 and info["model_input_size"] is None
    assert tuple(record["img_size"]) == (64, 64, 3)  # the poisoned images are stored at the resized size
    sd = record["model"]
    assert sd["fc.weight"].shape == (100, 512)
    # two SGD steps at lr 0.001 move the pretrained backbone by far less than its own scale (a fresh init would not
    # match)
    w0 = imagenet["layer4.1.conv2.weight"]
    assert float((sd["layer4.1.conv2.weight"] - w0).norm()) < 0.01 * float(w0.norm())

    cfg = resolve(RECORD_SCHEMA, None, {"result_file": str(rec), "device": "cpu", "no_progress": True})
    exp = open_experiment(cfg)
    model = exp.backdoored_model().eval()
    assert exp.model_input_size is None and exp.geometry == InputGeometry(64, 56)
    assert exp.norm.normalization == "imagenet" and exp.evalsets.bd.view_shape == (3, 56, 56)
    with torch.no_grad():
        assert model(torch.rand(2, 3, 56, 56)).shape == (2, 100)


def test_attack_refuses_bad_model_settings_before_training(tmp_path, capsys):
    """alexnet on 32x32 data and a --pretrained that is neither a file nor a cached weights name stop the attack
    before any poisoning or training, with one-line errors naming the fix."""
    from bdsafety.errors import ConfigError
    from bdsafety.registry import get

    base = ["--yaml_path", str(CFG / "attack" / "badnet" / "demo.yaml"), "--record_root", str(tmp_path),
            "--synthetic_n_train", "20", "--synthetic_n_test", "10", "--epochs", "1", "--no_progress"]
    main = get("attack", "badnet").main
    with pytest.raises(ConfigError, match="alexnet cannot take 32x32 inputs.*model_input_size"):
        main([*base, "--model", "alexnet"])
    with pytest.raises(ConfigError, match=r"--pretrained .*nope\.pth: no such file"):
        main([*base, "--model", "resnet18", "--pretrained", str(tmp_path / "nope.pth")])
    assert not any(tmp_path.iterdir())  # no record folder was started


def test_vit_runs_the_tools(zoo_records, capsys):
    """ViT-B/16 as BackdoorBench builds it (Resize inside the model, every key under '1.'), at model_input_size 32
    (BackdoorBench: 224; keys and the code path are the same, the positional embedding is 5 tokens long instead of
    197): features() is the class token after the encoder, FST re-initialises heads.head, PAM (its trigger inversion
    included) and one RA epoch run on a record of it. 10 reserved images, batches of 10."""
    from bdsafety.inspector import main as inspect
    from bdsafety.registry import get
    from bdsafety.retune.ra import main as ra

    arch = "vit_b_16"
    rec = zoo_records / arch
    shutil.copytree(zoo_records / ATTACK_ARCH, rec, ignore=shutil.ignore_patterns("defense", "bti_inversion"))
    result = safe_torch_load(rec / "attack_result.pt")
    torch.manual_seed(1)
    result["model_name"], result["model"] = arch, build_model(arch, 10, input_size=SIZED[arch]).state_dict()
    torch.save(result, rec / "attack_result.pt")
    info = safe_torch_load(rec / "info.pickle")
    torch.save({**info, "model_input_size": SIZED[arch]}, rec / "info.pickle")
    start = {k: v.clone() for k, v in result["model"].items()}
    del result
    assert inspect([str(rec)]) == 0
    assert f"architecture  weights fit {arch}" in capsys.readouterr().out
    tiny = ["--no_progress", "--ratio", "10", "--batch_size", "10", "--epochs", "1"]
    pam = _one(get("defense", "pam").main([
        "--result_file", str(rec), "--yaml_path", str(CFG / "defense" / "pam" / "demo.yaml"), "--n_rounds", "1",
        "--bti_pretrain_epochs", "1", "--bti_mask_epochs", "1", "--bti_gen_epochs", "1",
        "--bti_batch_size", "10", *tiny]))
    assert list(_rows(pam, "pam")["epoch"]) == [0, 1] and _changed(start, pam / "defense_result.pt", arch) > 0
    fst = _one(get("defense", "fst").main(["--result_file", str(rec), "--yaml_path",
                                           str(CFG / "defense" / "fst" / "demo.yaml"), *tiny]))
    saved = safe_torch_load(fst / "defense_result.pt")["model"]
    assert not torch.equal(saved["1.heads.head.weight"], start["1.heads.head.weight"])
    info = yaml.safe_load((fst / "config.yaml").read_text())
    assert info["head_weight_norm_final"] == pytest.approx(info["head_weight_norm_original"], rel=1e-4)
    (out,) = ra(["--result_file", str(rec), "--defense", "fst", "--yaml_path",
                 str(CFG / "retune_attack" / "ra" / "demo.yaml"), "--poison_num", "2", "--ratio", "10",
                 "--batch_size", "10", "--epochs", "1", "--no_progress"])
    assert list(_rows(out, "ra")["epoch"]) == [0, 1]
    assert _changed(saved, out / "ra_result.pt", arch) > 0
