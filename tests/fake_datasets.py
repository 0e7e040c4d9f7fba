"""Tiny fake copies of each real dataset, written in the dataset's exact on-disk format.

Each ``make_fake_*`` writes the files and returns a :class:`FakeData` with the arrays a correct loader
must produce. Images are either random pixels at the dataset's native size (lossless formats: checked
exactly) or one solid colour (any size, or JPEG: the colour survives resizing and, nearly, JPEG).
"""
from __future__ import annotations

import csv
import os
import struct
from dataclasses import dataclass

import numpy as np
from PIL import Image


@dataclass
class FakeData:
    """What the loader must return. ``tolerance``: max abs pixel error allowed (JPEG); 0 = exact."""

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    classes: list[str] | None
    tolerance: int = 0


def _random_images(rng: np.random.Generator, n: int, h: int, w: int) -> np.ndarray:
    return rng.integers(0, 256, size=(n, h, w, 3), dtype=np.uint8)


def _solid(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    return np.broadcast_to(rng.integers(0, 256, size=3, dtype=np.uint8), (h, w, 3)).copy()


# ---------------------------------------------------------------- cifar (python pickle batches)


def _cifar_rows(x: np.ndarray) -> np.ndarray:
    """NHWC images -> CIFAR rows: 1024 red, 1024 green, 1024 blue bytes, each plane row-major."""
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2).reshape(len(x), 3072))


def _dump(path: str, obj: dict) -> None:
    """Write ``obj`` as the official batches are: a Python 2 cPickle (protocol 2) with numpy arrays."""
    with open(path, "wb") as f:
        f.write(b"\x80\x02" + _py2_pickle(obj) + b".")


def _py2_str(s: str) -> bytes:
    b = s.encode("latin1")
    return b"U" + bytes([len(b)]) + b if len(b) < 256 else b"T" + struct.pack("<i", len(b)) + b


def _py2_pickle(obj) -> bytes:
    """Pickle opcodes as Python 2 wrote them (str as BINSTRING, arrays via numpy.core.multiarray),
    for the dict/list/str/int/uint8-array content of CIFAR batches."""
    if isinstance(obj, dict):
        return b"}(" + b"".join(_py2_pickle(k) + _py2_pickle(v) for k, v in obj.items()) + b"u"
    if isinstance(obj, list):
        return b"](" + b"".join(_py2_pickle(v) for v in obj) + b"e"
    if isinstance(obj, str):
        return _py2_str(obj)
    if isinstance(obj, int):
        return b"J" + struct.pack("<i", obj)
    assert isinstance(obj, np.ndarray) and obj.dtype == np.uint8
    shape = b"(" + b"".join(b"J" + struct.pack("<i", n) for n in obj.shape) + b"t"
    dtype = (b"cnumpy\ndtype\n" + _py2_str("u1") + b"K\x00K\x01\x87R"
             b"(K\x03" + _py2_str("|") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb")
    return (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85" + _py2_str("b") + b"\x87R"
            b"(K\x01" + shape + dtype + b"\x89" + _py2_str(np.ascontiguousarray(obj).tobytes().decode("latin1"))
            + b"tb")


def make_fake_cifar10(root: str, n_train: int = 25, n_test: int = 10, seed: int = 0) -> FakeData:
    """Write ``root/cifar-10-batches-py/`` (data_batch_1..5, test_batch, batches.meta)."""
    rng = np.random.default_rng(seed)
    base = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(base, exist_ok=True)
    classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    tx, vx = _random_images(rng, n_train, 32, 32), _random_images(rng, n_test, 32, 32)
    ty, vy = rng.integers(0, 10, n_train).astype(np.int64), rng.integers(0, 10, n_test).astype(np.int64)
    for b, idx in enumerate(np.array_split(np.arange(n_train), 5), start=1):
        _dump(os.path.join(base, f"data_batch_{b}"), {
            "batch_label": f"training batch {b} of 5",
            "labels": [int(v) for v in ty[idx]],
            "data": _cifar_rows(tx[idx]),
            "filenames": [f"img_{i}.png" for i in idx],
        })
    _dump(os.path.join(base, "test_batch"), {
        "batch_label": "testing batch 1 of 1",
        "labels": [int(v) for v in vy],
        "data": _cifar_rows(vx),
        "filenames": [f"test_{i}.png" for i in range(n_test)],
    })
    _dump(os.path.join(base, "batches.meta"), {"num_cases_per_batch": 10000, "label_names": classes, "num_vis": 3072})
    return FakeData(tx, ty, vx, vy, classes)


def make_fake_cifar100(root: str, n_train: int = 25, n_test: int = 10, seed: int = 0) -> FakeData:
    """Write ``root/cifar-100-python/`` (train, test, meta); labels are the fine labels."""
    rng = np.random.default_rng(seed)
    base = os.path.join(root, "cifar-100-python")
    os.makedirs(base, exist_ok=True)
    fine = [f"fine_{i:03d}" for i in range(100)]
    tx, vx = _random_images(rng, n_train, 32, 32), _random_images(rng, n_test, 32, 32)
    ty, vy = rng.integers(0, 100, n_train).astype(np.int64), rng.integers(0, 100, n_test).astype(np.int64)
    for name, label, x, y in (("train", "training", tx, ty), ("test", "testing", vx, vy)):
        _dump(os.path.join(base, name), {
            "filenames": [f"{name}_{i}.png" for i in range(len(x))],
            "batch_label": f"{label} batch 1 of 1",
            "fine_labels": [int(v) for v in y],
            "coarse_labels": [int(v) // 5 for v in y],
            "data": _cifar_rows(x),
        })
    _dump(os.path.join(base, "meta"),
          {"fine_label_names": fine, "coarse_label_names": [f"coarse_{i}" for i in range(20)]})
    return FakeData(tx, ty, vx, vy, fine)


# ---------------------------------------------------------------- gtsrb (.ppm + semicolon csv)

_GTSRB_HEADER = ["Filename", "Width", "Height", "Roi.X1", "Roi.Y1", "Roi.X2", "Roi.Y2", "ClassId"]


def write_ppm(path: str, img: np.ndarray) -> None:
    """Binary PPM (P6), RGB bytes in row-major order: the format of the GTSRB images."""
    h, w, _ = img.shape
    with open(path, "wb") as f:
        f.write(f"P6\n{w} {h}\n255\n".encode("ascii") + np.ascontiguousarray(img, dtype=np.uint8).tobytes())


def _gtsrb_image(rng: np.random.Generator, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(file image, expected 32x32 image): even k random 32x32, odd k a solid colour of another size."""
    if k % 2 == 0:
        img = _random_images(rng, 1, 32, 32)[0]
        return img, img
    h, w = (int(v) for v in rng.integers(15, 60, size=2))
    img = _solid(rng, h, w)
    return img, img[:1, :1].repeat(32, 0).repeat(32, 1)


def _write_gtsrb_csv(path: str, rows: list[list], header: list[str] = _GTSRB_HEADER) -> None:
    with open(path, "w", newline="") as f:
        csv.writer(f, delimiter=";").writerows([header] + rows)  # csv's default \r\n line ends


def make_fake_gtsrb(root: str, n_train_per_class: int = 1, n_test: int = 12, seed: int = 0) -> FakeData:
    """Write ``root/Train/000NN/GT-000NN.csv`` + .ppm for all 43 classes, and ``root/Test/`` with
    GT-final_test.csv (labels) and GT-final_test.test.csv (the unlabelled one of the images zip)."""
    rng = np.random.default_rng(seed)
    tx, ty, k = [], [], 0
    for c in range(43):
        folder = os.path.join(root, "Train", f"{c:05d}")
        os.makedirs(folder, exist_ok=True)
        rows = []
        for j in range(n_train_per_class):
            img, expected = _gtsrb_image(rng, k)
            k += 1
            fname = f"{c:05d}_{j:05d}.ppm"
            write_ppm(os.path.join(folder, fname), img)
            h, w, _ = img.shape
            rows.append([fname, w, h, 1, 1, w - 2, h - 2, c])
            tx.append(expected)
            ty.append(c)
        _write_gtsrb_csv(os.path.join(folder, f"GT-{c:05d}.csv"), rows)
    test_dir = os.path.join(root, "Test")
    os.makedirs(test_dir, exist_ok=True)
    vx, vy, rows = [], [], []
    for i in range(n_test):
        img, expected = _gtsrb_image(rng, i)
        label = int(rng.integers(0, 43))
        fname = f"{i:05d}.ppm"
        write_ppm(os.path.join(test_dir, fname), img)
        h, w, _ = img.shape
        rows.append([fname, w, h, 1, 1, w - 2, h - 2, label])
        vx.append(expected)
        vy.append(label)
    _write_gtsrb_csv(os.path.join(test_dir, "GT-final_test.csv"), rows)
    _write_gtsrb_csv(os.path.join(test_dir, "GT-final_test.test.csv"), [r[:-1] for r in rows], _GTSRB_HEADER[:-1])
    return FakeData(np.stack(tx), np.array(ty, np.int64), np.stack(vx), np.array(vy, np.int64), None)


# ---------------------------------------------------------------- tiny-imagenet-200 (JPEG)


def make_fake_tiny(
    root: str,
    n_classes: int = 3,
    n_train_per_class: int = 2,
    n_val_per_class: int = 2,
    nested: bool = True,
    val_layout: str = "original",
    seed: int = 0,
) -> FakeData:
    """Write a tiny-imagenet-200 copy with solid-colour 64x64 JPEGs.

    nested: inside ``root/tiny-imagenet-200`` (BackdoorBench) or directly in ``root``.
    val_layout: "original" (val/images + val_annotations.txt) or "backdoorbench" (val/<wnid>/, the
    form BackdoorBench's TinyImageNet reorganizes val into). wnids.txt is deliberately not sorted:
    class indices follow the sorted train folders, like BackdoorBench's ImageFolder.
    The first train image of the first class is grayscale (Tiny has some).
    """
    assert val_layout in ("original", "backdoorbench")
    rng = np.random.default_rng(seed)
    base = os.path.join(root, "tiny-imagenet-200") if nested else root
    wnids = sorted({f"n{int(v):08d}" for v in rng.integers(1_000_000, 99_999_999, size=n_classes)})
    assert len(wnids) == n_classes
    with open(os.path.join(_mkdir(base), "wnids.txt"), "w") as f:
        f.writelines(w + "\n" for w in reversed(wnids))
    with open(os.path.join(base, "words.txt"), "w") as f:
        f.writelines(f"{w}\tthing {i}\n" for i, w in enumerate(wnids))

    tx, ty = [], []
    for c, wnid in enumerate(wnids):
        images = _mkdir(os.path.join(base, "train", wnid, "images"))
        boxes = []
        for j in range(n_train_per_class):
            gray = c == 0 and j == 0
            fname = f"{wnid}_{j}.JPEG"
            tx.append(_write_jpeg(os.path.join(images, fname), rng, gray))
            ty.append(c)
            boxes.append(f"{fname}\t0\t0\t63\t63\n")
        with open(os.path.join(base, "train", wnid, f"{wnid}_boxes.txt"), "w") as f:
            f.writelines(boxes)

    # val file numbers are shuffled across classes, so file order differs from (class, file) order
    n_val = n_classes * n_val_per_class
    owner = rng.permutation(np.arange(n_val) % n_classes)
    items = []
    for k in range(n_val):
        wnid = wnids[owner[k]]
        fname = f"val_{k}.JPEG"
        folder = os.path.join(base, "val", "images" if val_layout == "original" else wnid)
        img = _write_jpeg(os.path.join(_mkdir(folder), fname), rng, False)
        items.append((wnid, fname, img))
    if val_layout == "original":
        with open(os.path.join(base, "val", "val_annotations.txt"), "w") as f:
            f.writelines(f"{fname}\t{wnid}\t0\t0\t63\t63\n" for wnid, fname, _ in items)
    _write_jpeg(os.path.join(_mkdir(os.path.join(base, "test", "images")), "test_0.JPEG"), rng, False)

    items.sort(key=lambda t: (t[0], t[1]))  # BackdoorBench's order: ImageFolder over val/<wnid>/
    vx = np.stack([img for _, _, img in items])
    vy = np.array([wnids.index(w) for w, _, _ in items], np.int64)
    return FakeData(np.stack(tx), np.array(ty, np.int64), vx, vy, wnids, tolerance=4)


def _mkdir(path: str) -> str:
    os.makedirs(path, exist_ok=True)
    return path


def _write_jpeg(path: str, rng: np.random.Generator, gray: bool) -> np.ndarray:
    img = _solid(rng, 64, 64)
    if gray:
        img[:] = img[:1, :1, :1]
        Image.fromarray(img[:, :, 0]).save(path, format="JPEG", quality=95)
    else:
        Image.fromarray(img).save(path, format="JPEG", quality=95)
    return img


# ---------------------------------------------------------------- imagefolder (user data)


def make_fake_imagefolder(
    root: str,
    classes: tuple[str, ...] = ("cat", "dog", "zebra"),
    n_train_per_class: int = 3,
    n_test_per_class: int = 2,
    size: tuple[int, int] = (24, 20),
    seed: int = 0,
) -> FakeData:
    """Write ``root/train/<class>/`` and ``root/test/<class>/`` at ``size`` (H, W), lossless formats.

    Per class and split: random-pixel PNGs, one of them grayscale and one saved as .bmp, plus one
    solid-colour .png of another size (resized by the loader) and a notes.txt the loader must skip.
    """
    rng = np.random.default_rng(seed)
    h, w = size
    out = {}
    for split, n in (("train", n_train_per_class), ("test", n_test_per_class)):
        xs, ys = [], []
        for c, cls in enumerate(sorted(classes)):
            folder = _mkdir(os.path.join(root, split, cls))
            for j in range(n):
                img = _random_images(rng, 1, h, w)[0]
                if j == 1:  # grayscale file: the loader must give 3 equal channels
                    img[:] = img[:, :, :1]
                    Image.fromarray(img[:, :, 0]).save(os.path.join(folder, f"img_{j}.png"))
                elif j == 2:
                    Image.fromarray(img).save(os.path.join(folder, f"img_{j}.bmp"))
                else:
                    Image.fromarray(img).save(os.path.join(folder, f"img_{j}.png"))
                xs.append(img)
                ys.append(c)
            odd = _solid(rng, h + 7, w + 3)
            Image.fromarray(odd).save(os.path.join(folder, "z_odd_size.png"))
            xs.append(odd[:h, :w])
            ys.append(c)
            with open(os.path.join(folder, "notes.txt"), "w") as f:
                f.write("not an image\n")
        out[split] = (np.stack(xs), np.array(ys, np.int64))
    return FakeData(*out["train"], *out["test"], sorted(classes))
