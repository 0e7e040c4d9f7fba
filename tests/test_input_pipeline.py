"""The official fork's CIFAR-100 / Tiny-ImageNet input pipeline on device-resident batches (input_resize /
input_crop / normalization): resize before the trigger and the augmentation, bit-exact with the torchvision + PIL
transforms it replaces, at test sizes (resize 64 / crop 56 instead of 256 / 224: the same code path)."""
import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image

from bdsafety.data.device import (
    DeviceDataset,
    InputGeometry,
    Normalizer,
    center_crop,
    input_geometry,
    iterate_batches,
    pil_resize,
)
from bdsafety.data.info import IMAGENET_MEAN, IMAGENET_STD, dataset_info
from bdsafety.errors import ConfigError


def _nchw(x_nhwc: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(x_nhwc).permute(0, 3, 1, 2)


def _nhwc(x: torch.Tensor) -> np.ndarray:
    return x.permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("n, size", [(32, 224), (32, 256), (64, 224), (64, 256), (32, 64), (32, 56), (40, 29)])
def test_pil_resize_is_bit_exact_with_torchvision_resize_on_pil_images(n, size):
    x = np.random.default_rng(n * size).integers(0, 256, (4, n, n, 3), dtype=np.uint8)
    ref = np.stack([np.asarray(T.Resize((size, size))(Image.fromarray(a))) for a in x])
    np.testing.assert_array_equal(_nhwc(pil_resize(_nchw(x), size)), ref)


def test_evaluation_view_is_resize_then_center_crop():
    x = np.random.default_rng(1).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    ds = DeviceDataset(x, np.zeros(5), geometry=InputGeometry(64, 56))
    ref = np.stack([np.asarray(T.Compose([T.Resize((64, 64)), T.CenterCrop(56)])(Image.fromarray(a))) for a in x])
    np.testing.assert_array_equal(_nhwc(ds.view()), ref)
    (xb, _, _), = list(iterate_batches(ds, 8))
    np.testing.assert_array_equal(_nhwc(xb), ref)
    assert ds.view_shape == (3, 56, 56)


def test_training_view_is_resize_then_padded_random_crop_without_flip():
    """Every augmented draw is one of the (64 + 8 - 56 + 1)**2 windows of the zero-padded resized image (torchvision's
    RandomCrop(56, padding=4) after Resize(64)), never flipped with hflip off, and the draws cover the windows."""
    x = np.random.default_rng(2).integers(0, 256, (1, 32, 32, 3), dtype=np.uint8)
    g = InputGeometry(64, 56)
    ds = DeviceDataset(np.repeat(x, 400, 0), np.zeros(400), geometry=g)
    padded = torch.nn.functional.pad(pil_resize(_nchw(x), 64), (4, 4, 4, 4))[0]
    windows = {padded[:, i:i + 56, j:j + 56].numpy().tobytes(): (i, j) for i in range(17) for j in range(17)}
    assert len(windows) == 17 * 17
    gen = torch.Generator().manual_seed(0)
    seen = set()
    for xb, _, _ in iterate_batches(ds, 100, shuffle=True, augment=True, hflip=False, generator=gen):
        assert xb.shape[1:] == (3, 56, 56)
        for im in xb:
            seen.add(windows[im.numpy().tobytes()])  # KeyError: not a window of the padded resized image
    assert len(seen) > 0.7 * 17 * 17  # 400 draws over 289 equally likely windows cover about 3/4 of them


def test_mixed_sizes_frozen_samples_and_subsets():
    """A dataset holding clean images at 32 px and poisoned ones stamped at 64 px (the record's bd images): every
    sample is resized from its own size; frozen samples come out as the evaluation view; subset/concat keep it."""
    rng = np.random.default_rng(3)
    clean = rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    big = rng.integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    g = InputGeometry(64, 56)
    a = DeviceDataset(clean, np.arange(6), geometry=g)
    b = DeviceDataset(big, [10, 11], geometry=g, frozen=True)
    ds = DeviceDataset.concat([a, b])
    assert len(ds) == 8 and ds.slot is not None
    want = torch.cat([center_crop(pil_resize(_nchw(clean), 64), 56), center_crop(_nchw(big), 56)])
    assert torch.equal(ds.view(), want)
    gen = torch.Generator().manual_seed(0)
    for xb, _y, idx in iterate_batches(ds, 8, shuffle=True, augment=True, hflip=True, generator=gen):
        for im, i in zip(xb, idx.tolist()):
            if i >= 6:
                assert torch.equal(im, want[i])  # frozen: the evaluation view, never cropped or flipped
    sub = ds.subset([7, 2])
    assert torch.equal(sub.view(), want[[7, 2]]) and sub.y.tolist() == [11, 2]
    assert torch.equal(sub.with_labels(torch.tensor([0, 1])).view(), want[[7, 2]])
    with pytest.raises(ValueError, match="input geometry"):
        DeviceDataset.concat([DeviceDataset(clean, np.arange(6)), DeviceDataset(big, [1, 2])])


def test_augmentation_drawn_once_follows_the_geometry():
    """RA's ``augment_draw: once`` copy of a resized dataset: every sample at the crop size, the frozen (poisoned) ones
    as the evaluation view, the others one window of their padded resized image; the copy hands them out as they are."""
    rng = np.random.default_rng(4)
    clean = rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    big = rng.integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    g = InputGeometry(64, 56)
    ds = DeviceDataset.concat([DeviceDataset(clean, np.arange(5), geometry=g),
                               DeviceDataset(big, [7, 8], geometry=g, frozen=True)])
    once = ds.augmented_once(flip=False, generator=torch.Generator().manual_seed(0))
    assert once.geometry is None and tuple(once.x.shape[1:]) == (3, 56, 56)
    assert torch.equal(once.x[5:], ds.view()[5:])
    padded = torch.nn.functional.pad(pil_resize(_nchw(clean), 64), (4, 4, 4, 4))
    for k in range(5):
        assert any(torch.equal(once.x[k], padded[k, :, i:i + 56, j:j + 56]) for i in range(17) for j in range(17))
    (xb, _, _), = list(iterate_batches(once, 8))
    assert torch.equal(xb, once.x)


def test_geometry_options_are_validated():
    assert input_geometry(None) is None
    assert input_geometry(256, 224) == InputGeometry(256, 224, 4)
    assert input_geometry(224) == InputGeometry(224, 224, 4)
    with pytest.raises(ConfigError, match="input_crop 224 without input_resize"):
        input_geometry(None, 224)
    with pytest.raises(ConfigError, match="larger than input_resize"):
        input_geometry(200, 224)


def test_imagenet_normalization():
    info = dataset_info("cifar100")
    imnet = Normalizer(info, normalization="imagenet")
    assert torch.allclose(imnet.mean.flatten(), torch.tensor(IMAGENET_MEAN))
    assert torch.allclose(imnet.std.flatten(), torch.tensor(IMAGENET_STD))
    own = Normalizer(info)
    assert torch.allclose(own.mean.flatten(), torch.tensor(info.mean))


def test_resized_badnet_trigger_is_backdoorbenchs_resized_trigger_image():
    """At 224 px BackdoorBench stamps its 32 px trigger image resized to 224 (PIL bilinear) as
    img * (t == 0) + t * (t > 0): the patch keeps its relative size and gets a soft edge."""
    from bdsafety.attacks.triggers import apply_badnet

    x32 = np.random.default_rng(4).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    x224 = np.stack([np.asarray(T.Resize((224, 224))(Image.fromarray(a))) for a in x32])
    trig = np.zeros((32, 32, 3), dtype=np.uint8)
    trig[29:, 29:] = 255  # BackdoorBench's resource/badnet/trigger_image.png: a 3x3 white square, bottom right
    t = np.asarray(T.Resize((224, 224))(Image.fromarray(trig)))
    ref = x224 * (t == 0) + t * (t > 0)
    out = apply_badnet(x224, patch=3, native=(32, 32))
    np.testing.assert_array_equal(out, ref)
    assert (t > 0).any(axis=2).sum() == 24 * 24 and (out != x224).any(axis=(0, 3)).sum() >= 21 * 21
    np.testing.assert_array_equal(apply_badnet(x32, 3, native=(32, 32)), apply_badnet(x32, 3))  # native: unchanged


def test_attack_input_options_are_checked(tmp_path):
    from bdsafety.registry import get

    base = ["--dataset", "synthetic", "--synthetic_n_train", "40", "--synthetic_n_test", "20", "--epochs", "1",
            "--record_root", str(tmp_path), "--no_progress", "--device", "cpu", "--model", "cnn_small"]
    with pytest.raises(ConfigError, match="input_resize is not implemented for wanet.*badnet, blended, sig"):
        get("attack", "wanet").main(base + ["--input_resize", "40"])
    with pytest.raises(ConfigError, match="model_input_size 64 and input_resize 40 / input_crop 40 disagree"):
        get("attack", "badnet").main(base + ["--input_resize", "40", "--model", "resnet18", "--model_input_size", "64"])
    with pytest.raises(ConfigError, match="'normalization' must be one of"):
        get("attack", "badnet").parse(base + ["--normalization", "cifar"])


def test_fork_record_geometry_is_inferred_from_its_img_size():
    """A record of the official fork's CIFAR-100 pipeline stores its poisoned images at img_size 224 while the clean
    data is 32 px: it is read with Resize(224) + crop 224; our records say so in info; others have none."""
    from types import SimpleNamespace

    from bdsafety.experiment import record_geometry, run_geometry

    info = dataset_info("cifar100")
    fork = SimpleNamespace(img_size=(224, 224, 3), info={})
    assert record_geometry(fork, info) == InputGeometry(224, 224)
    ours = SimpleNamespace(img_size=(256, 256, 3), info={"input_resize": 256, "input_crop": 224})
    assert record_geometry(ours, info) == InputGeometry(256, 224)
    plain = SimpleNamespace(img_size=(32, 32, 3), info={"model_input_size": 224})
    assert record_geometry(plain, info) is None
    cfg = SimpleNamespace(input_resize=256, input_crop=None, model_input_size=None)
    rec, train = run_geometry(SimpleNamespace(img_size=(224, 224, 3), info={"input_resize": 224}), info, cfg)
    assert rec == InputGeometry(224, 224) and train == InputGeometry(256, 224)
    with pytest.raises(ConfigError, match="model_input_size 112 and the input crop 224"):
        run_geometry(fork, info, SimpleNamespace(input_resize=None, input_crop=None, model_input_size=112))


@pytest.mark.slow
def test_cifar100_paper_pipeline_end_to_end(tmp_path, monkeypatch):
    """config/attack/badnet/cifar100_paper.yaml on a fake 8-image CIFAR-100 at test sizes (cnn_small, no pretrained
    weights; resize 56 as the fork's 224, PAM's 64 / 56 as BTI-DBF's 256 / 224): the record stores the poisoned images
    exactly as the fork makes them (PIL Resize of the clean image, BackdoorBench's resized trigger image stamped
    after it); every model (attack, FST, RA, PAM) sees 56 px batches normalised with ImageNet statistics."""
    from pathlib import Path

    from bdsafety import engine
    from bdsafety.records import load_attack_record
    from bdsafety.registry import get
    from tests.fake_datasets import make_fake_cifar100

    cfg_dir = Path(__file__).resolve().parent.parent / "config"
    fake = make_fake_cifar100(str(tmp_path / "data" / "cifar100"), n_train=8, n_test=4)
    shapes = []
    real_prepare = engine.prepare_model

    def spy(model, device):
        model = real_prepare(model, device)
        model.register_forward_pre_hook(lambda m, a: shapes.append(tuple(a[0].shape[1:])))
        return model

    monkeypatch.setattr(engine, "prepare_model", spy)
    common = ["--record_root", str(tmp_path / "record"), "--device", "cpu", "--no_progress"]
    rec = Path(get("attack", "badnet").main([
        "--yaml_path", str(cfg_dir / "attack" / "badnet" / "cifar100_paper.yaml"),
        "--dataset_path", str(tmp_path / "data"), "--save_folder_name", "paper", "--model", "cnn_small",
        "--pretrained", "none", "--input_resize", "56", "--pratio", "0.25", "--epochs", "1",
        "--batch_size", "4", *common]))
    record = load_attack_record(rec)
    assert tuple(record.img_size) == (56, 56, 3) and record.info["normalization"] == "imagenet"
    trig = np.zeros((32, 32, 3), dtype=np.uint8)
    trig[29:, 29:] = 255
    t = np.asarray(T.Resize((56, 56))(Image.fromarray(trig)))
    for split, clean in ((record.bd_train, fake.train_x), (record.bd_test, fake.test_x)):
        assert len(split.indices) >= 1
        x = np.stack([np.asarray(T.Resize((56, 56))(Image.fromarray(clean[i]))) for i in split.indices])
        np.testing.assert_array_equal(split.images, x * (t == 0) + t * (t > 0))
    assert shapes and set(shapes) == {(3, 56, 56)}

    shapes.clear()
    get("defense", "fst").main(["--yaml_path", str(cfg_dir / "defense" / "fst" / "cifar100_paper.yaml"),
                                "--result_file", "paper", "--ratio", "4", "--epochs", "1",
                                "--batch_size", "4", *common])
    (ra_out,) = get("retune", "ra").main(["--yaml_path", str(cfg_dir / "retune_attack" / "ra" / "cifar100_paper.yaml"),
                                          "--result_file", "paper", "--defense", "fst", "--ratio", "4",
                                          "--poison_num", "1", "--epochs", "1", "--batch_size", "4", *common])
    get("defense", "pam").main(["--yaml_path", str(cfg_dir / "defense" / "pam" / "cifar100_paper.yaml"),
                                "--result_file", "paper", "--ratio", "4", "--input_resize", "64", "--input_crop", "56",
                                "--epochs", "1", "--n_rounds", "1", "--bti_pretrain_epochs", "1",
                                "--bti_mask_epochs", "1", "--bti_gen_epochs", "1", "--batch_size", "4", *common])
    assert shapes and set(shapes) == {(3, 56, 56)}
    meta = (rec / "defense" / "pam" / "config.yaml").read_text()
    assert "input_resize: 64" in meta and "ratio: 4" in meta
    assert (Path(ra_out) / "ra_df.csv").is_file()
