"""Clean datasets as uint8 arrays, read from BackdoorBench's on-disk layouts.

``root`` is the dataset's own folder (BackdoorBench: ``--dataset_path ./data`` + ``/<dataset>``).

- cifar10 / cifar100: torchvision's ``cifar-10-batches-py`` / ``cifar-100-python`` folders
  (downloaded with ``download=True``). Files whose md5 differs from the official release (re-packed
  or test copies) are read directly, in torchvision's format, with a restricted unpickler.
- gtsrb: ``Train/000NN/GT-000NN.csv`` + ``Test/GT-final_test.csv`` with .ppm images (BackdoorBench's GTSRB).
- tiny: ``tiny-imagenet-200`` (under root, or root itself); classes are the sorted train folder names,
  as BackdoorBench's ImageFolder-based TinyImageNet gives them.
- imagefolder: ``train/<class>/*`` and ``test/<class>/*`` (user data).
- synthetic: built in memory by :func:`bdsafety.data.synthetic.make_synthetic`.

Image files are decoded with PIL (RGB) and resized with PIL bilinear, as BackdoorBench's
``transforms.Resize`` does, so pixels match what BackdoorBench feeds its models. The decoded arrays
are cached in ``<root>/.bdsafety_cache/<split>_<H>x<W>.npz``; the cache is rebuilt whenever the list
of files (paths, sizes, labels, order) changes.
"""
from __future__ import annotations

import csv
import hashlib
import inspect
import json
import os
import pickle
import sys
import tempfile
import warnings
import zipfile
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from bdsafety.data import synthetic
from bdsafety.data.info import DATASETS, CleanData, dataset_info
from bdsafety.errors import DataError, DatasetNotFound

SUPPORTED = ("cifar10", "cifar100", "gtsrb", "tiny", "imagefolder", "synthetic")
UNSUPPORTED = ("mnist", "celeba", "imagenet")  # BackdoorBench datasets this project does not load
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".ppm")
CACHE_DIR = ".bdsafety_cache"
# from this many images (train + test) the synthetic data is cached in <root>/.bdsafety_cache/ (generating 60,000 hard
# images takes ~10 s on 2 busy cores, loading them < 1 s; every job of a study regenerates its record's data)
SYNTHETIC_CACHE_MIN = 20_000
_CACHE_VERSION = 1  # bump when decoding changes, so old caches are rebuilt


def load_clean_dataset(
    name: str,
    root: str,
    download: bool = True,
    img_size: tuple | None = None,
    progress: bool | None = None,
    **synthetic_kwargs,
) -> CleanData:
    """Load dataset ``name`` from its folder ``root``.

    img_size: (H, W), (H, W, 3) or an int for square; the output size for imagefolder (default: the first train image's
    size) and the square size of synthetic. Fixed-size datasets accept only their own size.
    progress: tqdm bar while decoding image files; None shows it when stderr is a terminal.
    synthetic_kwargs: passed to ``make_synthetic`` (n_train, n_test, seed, difficulty); synthetic only; from
        SYNTHETIC_CACHE_MIN images on, cached in <root>/.bdsafety_cache/.
    """
    if name in UNSUPPORTED:
        raise DataError(
            f"dataset {name!r} is a BackdoorBench dataset that bdsafety does not support; supported: "
            f"{', '.join(SUPPORTED)}. To use your own images, put them in the 'imagefolder' layout "
            "(<root>/train/<class>/*.png, <root>/test/<class>/*.png) and use dataset 'imagefolder'."
        )
    if name not in SUPPORTED:
        raise DataError(f"unknown dataset {name!r}; valid datasets: {', '.join(SUPPORTED)}")
    if synthetic_kwargs and name != "synthetic":
        raise TypeError(
            f"unexpected arguments for dataset {name!r}: {', '.join(sorted(synthetic_kwargs))} "
            "(only the synthetic dataset takes extra arguments)"
        )
    hw = _parse_img_size(img_size)
    if name == "synthetic":

        if hw is not None:
            if hw[0] != hw[1]:
                raise DataError(f"synthetic images are square; got img_size {img_size}")
            synthetic_kwargs["size"] = hw[0]
        size = int(synthetic_kwargs.get("size", 32))
        check_fits_memory(int(synthetic_kwargs.get("n_train", 5000)) + int(synthetic_kwargs.get("n_test", 1000)),
                          (size, size, 3), "synthetic", "lower synthetic_n_train / synthetic_n_test or the image size")
        if (int(synthetic_kwargs.get("n_train", 5000)) + int(synthetic_kwargs.get("n_test", 1000))
                >= SYNTHETIC_CACHE_MIN):
            return _cached_synthetic(root, synthetic_kwargs)
        return synthetic.make_synthetic(**synthetic_kwargs)  # 10 balanced classes, >= 10 test images by construction

    root = os.path.expanduser(os.fspath(root))
    if name == "imagefolder":
        return check_usable(_load_imagefolder(root, hw, progress), f"imagefolder {root}")
    info = DATASETS[name]
    if hw is not None and hw != tuple(info.img_size[:2]):
        raise DataError(
            f"{name} images are {info.img_size[0]}x{info.img_size[1]}; img_size={img_size} applies only to "
            "imagefolder (and square synthetic). Drop img_size for this dataset."
        )
    if name in ("cifar10", "cifar100"):
        return check_usable(_load_cifar(name, root, download), f"{name} {root}")
    if name == "gtsrb":
        return check_usable(_load_gtsrb(root, progress), f"gtsrb {root}")
    return check_usable(_load_tiny(root, download, progress), f"tiny {root}")


def available_memory() -> int:
    """Bytes of memory available now (MemAvailable on Linux; physical memory elsewhere; 0 when unknown)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 0


def check_fits_memory(n_images: int, shape: tuple, what: str, fix: str) -> None:
    """Refuse, before anything is decoded or generated, a dataset whose uint8 images alone (held twice: the arrays
    and their device copy) would not fit in the memory available."""
    need = 2 * int(n_images) * int(np.prod([int(s) for s in shape]))
    have = available_memory()
    if have and need > have:
        raise DataError(f"{what}: {n_images} images of {'x'.join(map(str, shape))} need about {need / 2**30:.1f} GiB "
                        f"of memory, but {have / 2**30:.1f} GiB are available; {fix}")


def check_usable(data: CleanData, what: str) -> CleanData:
    """A dataset no run can use is a DataError before any training: fewer than two classes, or an empty split."""
    n_classes = len(np.unique(data.train_y)) if len(data.train_y) else 0
    if n_classes < 2 or int(data.info.num_classes) < 2:
        raise DataError(f"{what}: the training set has {n_classes} class(es); a classifier (and a backdoor target) "
                        f"needs at least two classes: add images of another class")
    if len(data.test_y) == 0:
        raise DataError(f"{what}: the test split is empty, so C-Acc and ASR cannot be measured; add test images "
                        f"(e.g. <root>/test/<class>/*.png for imagefolder)")
    return data


def _parse_img_size(img_size) -> tuple[int, int] | None:
    if img_size is None:
        return None
    size = (int(img_size),) * 2 if isinstance(img_size, (int, np.integer)) else tuple(int(s) for s in img_size)
    if len(size) not in (2, 3) or min(size[:2]) < 1 or (len(size) == 3 and size[2] != 3):
        raise DataError(f"img_size must be (H, W) or (H, W, 3) with positive H, W; got {img_size}")
    return size[0], size[1]


def _not_found(name: str, tried: str, layout: str, fix: str, detail: str = "") -> DatasetNotFound:
    detail = f"{detail}\n" if detail else ""
    return DatasetNotFound(
        f"{name} dataset not found at {tried}\n{detail}Expected layout:\n{layout.rstrip()}\nFix: {fix}"
    )


# ---------------------------------------------------------------- cifar10 / cifar100

_CIFAR = {
    # name: (folder, train files, test files, meta file, meta key, label key)
    "cifar10": (
        "cifar-10-batches-py",
        [f"data_batch_{i}" for i in range(1, 6)],
        ["test_batch"],
        "batches.meta",
        "label_names",
        "labels",
    ),
    "cifar100": ("cifar-100-python", ["train"], ["test"], "meta", "fine_label_names", "fine_labels"),
}


def _load_cifar(name: str, root: str, download: bool) -> CleanData:
    from torchvision import datasets as tvd  # lazy: torchvision only for the real datasets' readers

    folder, train_files, test_files, meta_file, meta_key, label_key = _CIFAR[name]
    tv_class = tvd.CIFAR10 if name == "cifar10" else tvd.CIFAR100
    base = os.path.join(root, folder)
    needed = train_files + test_files + [meta_file]
    layout = f"{root}/\n  {folder}/\n" + "".join(f"    {f}\n" for f in needed)
    fix = (
        f"run once with download=True on a machine with internet (torchvision fetches {tv_class.url}), "
        f"or copy an existing {folder}/ folder into {root}"
    )
    missing = [f for f in needed if not os.path.isfile(os.path.join(base, f))]
    if missing:
        if not download:
            raise _not_found(name, base, layout, fix, f"missing: {', '.join(missing)} (download=False)")
        try:
            tv_class(root, train=True, download=True)
        except Exception as e:  # no network, proxy, bad archive: all mean the files are not there
            raise _not_found(name, base, layout, fix, f"download failed: {type(e).__name__}: {e}") from e

    try:
        splits = []
        for train in (True, False):
            ds = tv_class(root, train=train, download=False)
            splits.append((np.ascontiguousarray(ds.data, dtype=np.uint8), np.asarray(ds.targets, dtype=np.int64)))
        classes = list(ds.classes)
    except RuntimeError as e:  # torchvision's md5 check refused the files
        warnings.warn(
            f"{name}: files in {base} differ from the official release ({e}); reading them directly",
            stacklevel=3,
        )
        splits = [_read_cifar_batches(base, files, label_key) for files in (train_files, test_files)]
        classes = list(_unpickle(os.path.join(base, meta_file))[meta_key])
    (tx, ty), (vx, vy) = splits
    return CleanData(tx, ty, vx, vy, DATASETS[name], classes)


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that only builds numpy arrays (what CIFAR batches contain), never arbitrary objects."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # bytes written by Python 3's protocol 2
    }

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR batch file")
        return super().find_class(module, name)


def _unpickle(path: str) -> dict:
    with open(path, "rb") as f:
        return _ArrayUnpickler(f, encoding="latin1").load()


def _read_cifar_batches(base: str, files: list[str], label_key: str) -> tuple[np.ndarray, np.ndarray]:
    """Read CIFAR python batches the way torchvision does: rows of 3072 bytes, CHW planes -> NHWC."""
    data, labels = [], []
    for f in files:
        entry = _unpickle(os.path.join(base, f))
        data.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3072))
        labels.extend(entry[label_key])
    x = np.vstack(data).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(x), np.asarray(labels, dtype=np.int64)


# ---------------------------------------------------------------- decoding + cache


def _decode(path: str, hw: tuple[int, int]) -> np.ndarray:
    """One image file -> uint8 (H, W, 3) RGB; resized with PIL bilinear like transforms.Resize."""
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
    except (OSError, Image.DecompressionBombError, ValueError) as e:
        raise DataError(f"cannot read image {path} ({e}); replace or delete the file") from None
    if im.size != (hw[1], hw[0]):
        im = im.resize((hw[1], hw[0]), Image.BILINEAR)
    return np.asarray(im, dtype=np.uint8)


def _fingerprint(base: str, paths: list[str], labels: list[int]) -> str:
    """Hash of the ordered (relative path, size, label) list: changes when any file is added, removed,
    replaced by one of another size, relabelled or reordered."""
    h = hashlib.sha256()
    prefix = os.path.join(base, "")
    for p, y in zip(paths, labels):
        h.update(f"{p.removeprefix(prefix)}\t{os.path.getsize(p)}\t{y}\n".encode())
    return f"{len(paths)}:{h.hexdigest()}"


def _decode_split(
    name: str,
    root: str,
    split: str,
    base: str,
    paths: list[str],
    labels: list[int],
    hw: tuple[int, int],
    progress: bool | None,
) -> tuple[np.ndarray, np.ndarray]:
    """Decoded images of one split, from the cache when it matches the files, else decoded and cached."""
    cache = os.path.join(root, CACHE_DIR, f"{split}_{hw[0]}x{hw[1]}.npz")
    fp = _fingerprint(base, paths, labels)
    y = np.asarray(labels, dtype=np.int64)
    if os.path.isfile(cache):
        try:
            with np.load(cache, allow_pickle=False) as z:
                if int(z["version"]) == _CACHE_VERSION and str(z["fingerprint"]) == fp:
                    return z["x"], z["y"]
        except (OSError, ValueError, KeyError, zipfile.BadZipFile):
            pass  # unreadable cache: rebuild it

    x = np.empty((len(paths), hw[0], hw[1], 3), dtype=np.uint8)
    show = sys.stderr.isatty() if progress is None else progress
    pool = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1))
    try:
        decoded = pool.map(lambda p: _decode(p, hw), paths)
        for i, img in enumerate(tqdm(decoded, total=len(paths), desc=f"decoding {name} {split}", disable=not show)):
            x[i] = img
    finally:
        pool.shutdown(cancel_futures=True)  # after a bad file, do not wait for the rest to decode
    _write_cache(cache, x=x, y=y, fingerprint=np.array(fp), version=np.array(_CACHE_VERSION))
    return x, y


def _cached_synthetic(root: str, kwargs: dict) -> CleanData:
    """make_synthetic(**kwargs), cached under <root>/.bdsafety_cache/ keyed by every generator parameter."""
    bound = inspect.signature(synthetic.make_synthetic).bind(**kwargs)
    bound.apply_defaults()
    params = {k: (float(v) if k == "difficulty" else int(v)) for k, v in bound.arguments.items()}
    fp = json.dumps({**params, "generator_version": synthetic.GENERATOR_VERSION}, sort_keys=True)
    cache = os.path.join(os.path.expanduser(os.fspath(root)), CACHE_DIR,
                         f"synthetic_{hashlib.sha256(fp.encode()).hexdigest()[:16]}.npz")
    if os.path.isfile(cache):
        try:
            with np.load(cache, allow_pickle=False) as z:
                if str(z["fingerprint"]) == fp:
                    return synthetic.synthetic_data(z["train_x"], z["train_y"], z["test_x"], z["test_y"])
        except (OSError, ValueError, KeyError, zipfile.BadZipFile):
            pass  # unreadable cache: rebuild it
    data = synthetic.make_synthetic(**params)
    _write_cache(cache, train_x=data.train_x, train_y=data.train_y, test_x=data.test_x, test_y=data.test_y,
                 fingerprint=np.array(fp))
    return data


def _write_cache(path: str, **arrays) -> None:
    """Atomic write (temp file in the same folder, then rename); a read-only root only costs speed."""
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".npz.tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, **arrays)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError as e:
        warnings.warn(f"could not write the decode cache {path} ({e}); images will be decoded again next run",
                      stacklevel=2)


def _image_files(folder: str) -> list[str]:
    """Image files under ``folder`` (recursively), in torchvision ImageFolder's order."""
    out = []
    for dirpath, _, fnames in sorted(os.walk(folder, followlinks=True)):
        out.extend(os.path.join(dirpath, f) for f in sorted(fnames) if f.lower().endswith(IMAGE_EXTENSIONS))
    return out


def _class_dirs(folder: str) -> list[str]:
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))


# ---------------------------------------------------------------- gtsrb

_GTSRB_CLASSES = 43
_GTSRB_LAYOUT = """{root}/
  Train/
    00000/GT-00000.csv  00000_00000.ppm ...   (one folder per class: 00000 .. 00042)
    ...
    00042/GT-00042.csv  ...
  Test/
    GT-final_test.csv  00000.ppm 00001.ppm ...
  (csv: semicolon-separated, Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId)"""
_GTSRB_FIX = (
    "download GTSRB_Final_Training_Images.zip, GTSRB_Final_Test_Images.zip and GTSRB_Final_Test_GT.zip "
    "(https://sid.erda.dk/public/archives/daaeac0d7ce1152aea9b61d9f1e19370/), then move "
    "GTSRB/Final_Training/Images/* into {root}/Train/, GTSRB/Final_Test/Images/* into {root}/Test/ and unzip "
    "GTSRB_Final_Test_GT.zip into {root}/Test/ (BackdoorBench's sh/gtsrb_download.sh does exactly this)"
)


def _read_gtsrb_csv(csv_path: str, folder: str, root: str) -> tuple[list[str], list[int]]:
    if not os.path.isfile(csv_path):
        raise _not_found("gtsrb", root, _GTSRB_LAYOUT.format(root=root), _GTSRB_FIX.format(root=root),
                         f"missing: {csv_path}")
    with open(csv_path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f, delimiter=";"))
    header = rows[0] if rows else []
    if "Filename" not in header or "ClassId" not in header:
        raise DataError(
            f"{csv_path}: header {header} lacks Filename/ClassId; expected the official GTSRB csv "
            "(Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId). For the test set use GT-final_test.csv "
            "from GTSRB_Final_Test_GT.zip, not GT-final_test.test.csv (which has no labels)."
        )
    fi, ci = header.index("Filename"), header.index("ClassId")
    rows = [r for r in rows[1:] if r]
    paths = [os.path.join(folder, r[fi]) for r in rows]
    for p in paths:
        if not os.path.isfile(p):
            raise _not_found("gtsrb", root, _GTSRB_LAYOUT.format(root=root), _GTSRB_FIX.format(root=root),
                             f"{csv_path} lists {os.path.basename(p)}, which is missing")
    return paths, [int(r[ci]) for r in rows]


def _load_gtsrb(root: str, progress: bool | None) -> CleanData:
    layout, fix = _GTSRB_LAYOUT.format(root=root), _GTSRB_FIX.format(root=root)
    for sub in ("Train", "Test"):
        if not os.path.isdir(os.path.join(root, sub)):
            raise _not_found("gtsrb", os.path.join(root, sub), layout, fix)
    train_paths, train_labels = [], []
    for c in range(_GTSRB_CLASSES):
        folder = os.path.join(root, "Train", f"{c:05d}")
        p, y = _read_gtsrb_csv(os.path.join(folder, f"GT-{c:05d}.csv"), folder, root)
        train_paths += p
        train_labels += y
    test_dir = os.path.join(root, "Test")
    test_paths, test_labels = _read_gtsrb_csv(os.path.join(test_dir, "GT-final_test.csv"), test_dir, root)
    for labels in (train_labels, test_labels):
        if labels and not 0 <= min(labels) <= max(labels) < _GTSRB_CLASSES:
            raise DataError(f"gtsrb: ClassId outside 0..42 in the csv files under {root}")
    hw = DATASETS["gtsrb"].img_size[:2]
    tx, ty = _decode_split("gtsrb", root, "train", root, train_paths, train_labels, hw, progress)
    vx, vy = _decode_split("gtsrb", root, "test", root, test_paths, test_labels, hw, progress)
    return CleanData(tx, ty, vx, vy, DATASETS["gtsrb"], None)


# ---------------------------------------------------------------- tiny-imagenet-200

_TINY_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
_TINY_MD5 = "90528d7ca1a48142e341f4ef8d21d0de"
_TINY_LAYOUT = """{root}/
  tiny-imagenet-200/   (or its entries directly in {root}, as BackdoorBench's sh/timagenet_download.sh leaves them)
    wnids.txt
    train/<wnid>/images/<wnid>_0.JPEG ...          (200 class folders)
    val/images/val_0.JPEG ...  + val/val_annotations.txt
        (or val/<wnid>/*.JPEG, the form BackdoorBench's loader reorganizes val into)"""


def _tiny_base(root: str) -> str | None:
    for base in (os.path.join(root, "tiny-imagenet-200"), root):
        if os.path.isdir(os.path.join(base, "train")) and os.path.isdir(os.path.join(base, "val")):
            return base
    return None


def _load_tiny(root: str, download: bool, progress: bool | None) -> CleanData:
    layout = _TINY_LAYOUT.format(root=root)
    fix = f"run once with download=True on a machine with internet, or download {_TINY_URL} and unzip it into {root}"
    tried = f"{os.path.join(root, 'tiny-imagenet-200')} and {root}"
    base = _tiny_base(root)
    if base is None:
        if not download:
            raise _not_found("tiny", tried, layout, fix, "not downloaded (download=False)")
        try:
            from torchvision.datasets.utils import (  # lazy: torchvision only when downloading
                download_and_extract_archive,
            )

            download_and_extract_archive(_TINY_URL, root, md5=_TINY_MD5, remove_finished=True)
        except Exception as e:  # no network, proxy, bad archive: all mean the files are not there
            raise _not_found("tiny", tried, layout, fix, f"download failed: {type(e).__name__}: {e}") from e
        base = _tiny_base(root)
        if base is None:
            raise _not_found("tiny", tried, layout, fix, "the downloaded archive did not have this layout")

    classes = _class_dirs(os.path.join(base, "train"))
    index = {c: i for i, c in enumerate(classes)}
    train_paths, train_labels = [], []
    for c in classes:
        files = _image_files(os.path.join(base, "train", c))
        train_paths += files
        train_labels += [index[c]] * len(files)

    val = os.path.join(base, "val")
    annotations = os.path.join(val, "val_annotations.txt")
    if os.path.isfile(annotations):
        with open(annotations, encoding="utf-8") as f:
            pairs = sorted((parts[1], parts[0]) for parts in (line.split() for line in f) if parts)
        val_items = [(os.path.join(val, "images", fname), wnid) for wnid, fname in pairs]
    else:  # BackdoorBench-reorganized val/<wnid>/
        val_items = [(p, c) for c in _class_dirs(val) for p in _image_files(os.path.join(val, c))]
    unknown = sorted({c for _, c in val_items} - set(index))
    if unknown:
        raise DataError(f"tiny: val classes {unknown[:5]} have no train folder in {base}/train")
    if not val_items:
        raise _not_found("tiny", val, layout, fix, "val/ holds no labelled images")
    for p, _ in val_items:
        if not os.path.isfile(p):
            raise _not_found("tiny", val, layout, fix, f"val_annotations.txt lists {p}, which is missing")
    test_paths = [p for p, _ in val_items]
    test_labels = [index[c] for _, c in val_items]

    hw = DATASETS["tiny"].img_size[:2]
    tx, ty = _decode_split("tiny", root, "train", base, train_paths, train_labels, hw, progress)
    vx, vy = _decode_split("tiny", root, "test", base, test_paths, test_labels, hw, progress)
    return CleanData(tx, ty, vx, vy, DATASETS["tiny"], classes)


# ---------------------------------------------------------------- imagefolder

_IMAGEFOLDER_LAYOUT = """{root}/
  train/<class>/*.png|jpg|jpeg|bmp|ppm     (one folder per class; class index = sorted folder names)
  test/<class>/*.png|...                   (the same class folders as train)"""


def _load_imagefolder(root: str, hw: tuple[int, int] | None, progress: bool | None) -> CleanData:
    layout = _IMAGEFOLDER_LAYOUT.format(root=root)
    fix = f"put your images in class folders under {root}/train and {root}/test"
    for split in ("train", "test"):
        if not os.path.isdir(os.path.join(root, split)):
            raise _not_found("imagefolder", os.path.join(root, split), layout, fix)
    classes = _class_dirs(os.path.join(root, "train"))
    test_classes = _class_dirs(os.path.join(root, "test"))
    if not classes:
        raise _not_found("imagefolder", os.path.join(root, "train"), layout, fix, "train/ has no class folders")
    if classes != test_classes:
        only_train = sorted(set(classes) - set(test_classes))
        only_test = sorted(set(test_classes) - set(classes))
        raise DataError(
            f"imagefolder {root}: train and test must have the same class folders; only in train: {only_train}, "
            f"only in test: {only_test}. Create the missing folders (a test folder may be empty) or rename them."
        )
    splits = {}
    for split in ("train", "test"):
        paths, labels = [], []
        for i, c in enumerate(classes):
            files = _image_files(os.path.join(root, split, c))
            if split == "train" and not files:
                raise DataError(
                    f"imagefolder: {os.path.join(root, split, c)} has no images "
                    f"(accepted extensions: {', '.join(IMAGE_EXTENSIONS)}); add images or remove the folder"
                )
            paths += files
            labels += [i] * len(files)
        splits[split] = (paths, labels)
    if hw is None:
        first = splits["train"][0][0]
        try:
            with Image.open(first) as im:
                hw = (im.height, im.width)
        except (OSError, Image.DecompressionBombError, ValueError) as e:
            raise DataError(f"cannot read image {first} ({e}); replace or delete the file, or give img_size") from None
    check_fits_memory(len(splits["train"][0]) + len(splits["test"][0]), (hw[0], hw[1], 3), f"imagefolder {root}",
                      "give a smaller img_size (H,W) to resize to")
    tx, ty = _decode_split("imagefolder", root, "train", root, *splits["train"], hw, progress)
    vx, vy = _decode_split("imagefolder", root, "test", root, *splits["test"], hw, progress)
    info = dataset_info("imagefolder", len(classes), (hw[0], hw[1], 3))
    return CleanData(tx, ty, vx, vy, info, classes)
