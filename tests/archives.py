"""Builders of tiny dataset archives in each dataset's official format.

Each ``make_*`` function writes into ``dest_dir`` the files that the dataset's
official download provides, filled with seeded random images, and returns what a
correct prepare step must produce from them: one ``ExpectedSplit`` per split and
the class names. The builders are written independently of the readers in
``msvq.data``, so a reader and its test cannot agree on a wrong format.

The formats follow the files as published:
- CIFAR-10 and CIFAR-100: gzip tar archives of pickles written by Python 2.
- STL-10: a gzip tar archive of raw uint8 binaries, each image plane column-major.
- Tiny ImageNet: a zip archive of 64x64 JPEGs, some of them grayscale.
- Fashion-MNIST: four gzip-compressed IDX files, not inside an archive.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import pickle
import struct
import tarfile
import zipfile
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image


class ExpectedSplit(NamedTuple):
    """Prepared content of one split: uint8 images (N, H, W, C) and int64 labels (N,)."""

    images: np.ndarray
    labels: np.ndarray


CIFAR10_CLASSES = [
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
]  # fmt: skip

# CIFAR-100 superclasses (coarse labels) with their five classes (fine labels).
# Both published name lists are in alphabetical order, which is the label order.
CIFAR100_SUPERCLASSES = {
    "aquatic_mammals": ["beaver", "dolphin", "otter", "seal", "whale"],
    "fish": ["aquarium_fish", "flatfish", "ray", "shark", "trout"],
    "flowers": ["orchid", "poppy", "rose", "sunflower", "tulip"],
    "food_containers": ["bottle", "bowl", "can", "cup", "plate"],
    "fruit_and_vegetables": ["apple", "mushroom", "orange", "pear", "sweet_pepper"],
    "household_electrical_devices": ["clock", "keyboard", "lamp", "telephone", "television"],
    "household_furniture": ["bed", "chair", "couch", "table", "wardrobe"],
    "insects": ["bee", "beetle", "butterfly", "caterpillar", "cockroach"],
    "large_carnivores": ["bear", "leopard", "lion", "tiger", "wolf"],
    "large_man-made_outdoor_things": ["bridge", "castle", "house", "road", "skyscraper"],
    "large_natural_outdoor_scenes": ["cloud", "forest", "mountain", "plain", "sea"],
    "large_omnivores_and_herbivores": ["camel", "cattle", "chimpanzee", "elephant", "kangaroo"],
    "medium_mammals": ["fox", "porcupine", "possum", "raccoon", "skunk"],
    "non-insect_invertebrates": ["crab", "lobster", "snail", "spider", "worm"],
    "people": ["baby", "boy", "girl", "man", "woman"],
    "reptiles": ["crocodile", "dinosaur", "lizard", "snake", "turtle"],
    "small_mammals": ["hamster", "mouse", "rabbit", "shrew", "squirrel"],
    "trees": ["maple_tree", "oak_tree", "palm_tree", "pine_tree", "willow_tree"],
    "vehicles_1": ["bicycle", "bus", "motorcycle", "pickup_truck", "train"],
    "vehicles_2": ["lawn_mower", "rocket", "streetcar", "tank", "tractor"],
}
CIFAR100_COARSE_CLASSES = sorted(CIFAR100_SUPERCLASSES)
CIFAR100_FINE_CLASSES = sorted(name for names in CIFAR100_SUPERCLASSES.values() for name in names)

STL10_CLASSES = [
    "airplane", "bird", "car", "cat", "deer",
    "dog", "horse", "monkey", "ship", "truck",
]  # fmt: skip

# The first ten Tiny ImageNet classes in wnid order, with their words.txt entries.
TINYIMAGENET_WORDS = {
    "n01443537": "goldfish, Carassius auratus",
    "n01629819": "European fire salamander, Salamandra salamandra",
    "n01641577": "bullfrog, Rana catesbeiana",
    "n01644900": "tailed frog, bell toad, ribbed toad, tailed toad, Ascaphus trui",
    "n01698640": "American alligator, Alligator mississipiensis",
    "n01742172": "boa constrictor, Constrictor constrictor",
    "n01768244": "trilobite",
    "n01770393": "scorpion",
    "n01774384": "black widow, Latrodectus mactans",
    "n01774750": "tarantula",
}
# WordNet entries that the real words.txt lists but that are no Tiny ImageNet class.
WORDNET_EXTRA_WORDS = {
    "n00001740": "entity",
    "n00001930": "physical entity",
    "n00002137": "abstraction, abstract entity",
}

FASHIONMNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip

# Fixed timestamps keep the archives byte-identical for a given seed.
_ARCHIVE_MTIME = 1_262_304_000  # 2010-01-01 00:00:00 UTC
_ZIP_DATE_TIME = (2010, 1, 1, 0, 0, 0)


def md5_of(path: str | Path) -> str:
    """Compute the hex MD5 digest of a file, reading it in 1 MiB chunks."""
    digest = hashlib.md5()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------------------
# Python 2 pickles
# ---------------------------------------------------------------------------


def dumps_python2_pickle(obj: object) -> bytes:
    """Serialize ``obj`` as Python 2's cPickle did with protocol 2.

    Python 3's pickler writes ``str`` as BINUNICODE, which loads as ``str`` under
    every encoding, and ``bytes`` as a call to ``_codecs.encode``, which always loads
    as ``bytes``. Python 2 wrote its ``str`` with SHORT_BINSTRING or BINSTRING, and
    Python 3 decodes those according to ``pickle.load(..., encoding=...)``: ``str``
    for "latin1", ``bytes`` for "bytes", and UnicodeDecodeError for the default
    "ASCII" when a byte is above 127. This writer emits that opcode stream for both
    ``str`` (encoded as latin-1) and ``bytes``.

    Supported values: dict, list, tuple, str, bytes, int, bool, None and
    C-contiguous numpy arrays of a fixed-size dtype. It writes no memo entries,
    which is valid pickle and loads the same way.
    """
    out = bytearray(pickle.PROTO + bytes([2]))
    _write_python2_value(out, obj)
    out += pickle.STOP
    return bytes(out)


def _write_python2_value(out: bytearray, value: object) -> None:
    if value is None:
        out += pickle.NONE
    elif isinstance(value, bool):
        out += pickle.NEWTRUE if value else pickle.NEWFALSE
    elif isinstance(value, (int, np.integer)):
        _write_python2_int(out, int(value))
    elif isinstance(value, str):
        _write_python2_str(out, value.encode("latin-1"))
    elif isinstance(value, bytes):
        _write_python2_str(out, value)
    elif isinstance(value, tuple):
        _write_python2_tuple(out, value)
    elif isinstance(value, list):
        out += pickle.EMPTY_LIST
        if value:
            out += pickle.MARK
            for item in value:
                _write_python2_value(out, item)
            out += pickle.APPENDS
    elif isinstance(value, dict):
        out += pickle.EMPTY_DICT
        if value:
            out += pickle.MARK
            for key, item in value.items():
                _write_python2_value(out, key)
                _write_python2_value(out, item)
            out += pickle.SETITEMS
    elif isinstance(value, np.ndarray):
        _write_python2_ndarray(out, value)
    else:
        raise TypeError(f"cannot write a Python 2 pickle of type {type(value).__name__}")


def _write_python2_int(out: bytearray, value: int) -> None:
    if 0 <= value < 1 << 8:
        out += pickle.BININT1 + struct.pack("<B", value)
    elif 0 <= value < 1 << 16:
        out += pickle.BININT2 + struct.pack("<H", value)
    elif -(1 << 31) <= value < 1 << 31:
        out += pickle.BININT + struct.pack("<i", value)
    else:
        encoded = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
        out += pickle.LONG1 + struct.pack("<B", len(encoded)) + encoded


def _write_python2_str(out: bytearray, data: bytes) -> None:
    if len(data) < 1 << 8:
        out += pickle.SHORT_BINSTRING + struct.pack("<B", len(data)) + data
    else:
        out += pickle.BINSTRING + struct.pack("<i", len(data)) + data


def _write_python2_tuple(out: bytearray, value: tuple) -> None:
    short_tuple_opcodes = {1: pickle.TUPLE1, 2: pickle.TUPLE2, 3: pickle.TUPLE3}
    if not value:
        out += pickle.EMPTY_TUPLE
    elif len(value) in short_tuple_opcodes:
        for item in value:
            _write_python2_value(out, item)
        out += short_tuple_opcodes[len(value)]
    else:
        out += pickle.MARK
        for item in value:
            _write_python2_value(out, item)
        out += pickle.TUPLE


def _write_python2_global(out: bytearray, module: str, name: str) -> None:
    out += pickle.GLOBAL + f"{module}\n{name}\n".encode("ascii")


def _write_python2_ndarray(out: bytearray, array: np.ndarray) -> None:
    """Write an array the way Python 2 numpy's ``ndarray.__reduce__`` described it.

    The stream is ``_reconstruct(ndarray, (0,), 'b')`` followed by BUILD with the
    state ``(1, shape, dtype, is_fortran, raw_bytes)``, and the dtype is
    ``dtype(str, 0, 1)`` with the version 3 state that Python 2 numpy wrote.
    """
    if not array.flags.c_contiguous or array.dtype.hasobject:
        raise TypeError("only C-contiguous arrays of a fixed-size dtype are supported")

    _write_python2_global(out, "numpy.core.multiarray", "_reconstruct")
    _write_python2_global(out, "numpy", "ndarray")
    _write_python2_value(out, (0,))
    _write_python2_value(out, "b")
    out += pickle.TUPLE3 + pickle.REDUCE

    out += pickle.MARK
    _write_python2_value(out, 1)
    _write_python2_value(out, tuple(int(size) for size in array.shape))
    _write_python2_dtype(out, array.dtype)
    _write_python2_value(out, False)
    _write_python2_str(out, array.tobytes())
    out += pickle.TUPLE + pickle.BUILD


def _write_python2_dtype(out: bytearray, dtype: np.dtype) -> None:
    if dtype.itemsize == 1:
        byte_order = "|"
    elif dtype.isnative:
        byte_order = "<"
    else:
        byte_order = ">"
    type_code = f"{dtype.kind}{dtype.itemsize}"

    _write_python2_global(out, "numpy", "dtype")
    _write_python2_value(out, (type_code, 0, 1))
    out += pickle.REDUCE
    _write_python2_value(out, (3, byte_order, None, None, None, -1, -1, 0))
    out += pickle.BUILD


# ---------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------


def _random_images(rng: np.random.Generator, count: int, size: int, channels: int) -> np.ndarray:
    return rng.integers(0, 256, size=(count, size, size, channels), dtype=np.uint8)


def _random_labels(rng: np.random.Generator, count: int, num_classes: int) -> np.ndarray:
    """Draw labels that cover min(count, num_classes) distinct classes."""
    return rng.permutation(np.arange(count) % num_classes).astype(np.int64)


def _write_tar_gz(path: Path, folder: str, files: dict[str, bytes]) -> None:
    """Write a gzip tar archive with the directory entry ``folder/`` and then ``files``."""
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=_ARCHIVE_MTIME) as compressed:
        with tarfile.open(fileobj=compressed, mode="w", format=tarfile.GNU_FORMAT) as archive:
            directory = tarfile.TarInfo(folder)
            directory.type = tarfile.DIRTYPE
            directory.mode = 0o755
            directory.mtime = _ARCHIVE_MTIME
            archive.addfile(directory)

            for name, data in files.items():
                member = tarfile.TarInfo(f"{folder}/{name}")
                member.size = len(data)
                member.mode = 0o644
                member.mtime = _ARCHIVE_MTIME
                archive.addfile(member, io.BytesIO(data))


def _to_channel_planar(images: np.ndarray) -> np.ndarray:
    """Flatten (N, H, W, C) images to (N, C*H*W): every channel plane whole, rows in order."""
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2).reshape(len(images), -1))


def _cifar_filenames(prefix: str, count: int) -> list[str]:
    return [f"{prefix}_s_{index:06d}.png" for index in range(count)]


# ---------------------------------------------------------------------------
# CIFAR-10 and CIFAR-100
# ---------------------------------------------------------------------------


def make_cifar10(dest_dir: str | Path, per_batch: int = 4, seed: int = 0) -> dict[str, ExpectedSplit | list[str]]:
    """Write ``cifar-10-python.tar.gz`` with ``per_batch`` images in each of its six batches.

    Returns ``{"train", "test", "classes"}``. The train split is data_batch_1 to
    data_batch_5 concatenated in that order, each batch in stored order; the test
    split is test_batch in stored order.
    """
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)

    batch_names = [f"data_batch_{number}" for number in range(1, 6)] + ["test_batch"]
    files: dict[str, bytes] = {}
    splits: dict[str, list[ExpectedSplit]] = {"train": [], "test": []}
    for batch_index, batch_name in enumerate(batch_names):
        images = _random_images(rng, per_batch, 32, 3)
        labels = _random_labels(rng, per_batch, len(CIFAR10_CLASSES))
        if batch_name == "test_batch":
            split, batch_label = "test", "testing batch 1 of 1"
        else:
            split, batch_label = "train", f"training batch {batch_index + 1} of 5"
        files[batch_name] = dumps_python2_pickle({
            "data": _to_channel_planar(images),
            "labels": labels.tolist(),
            "batch_label": batch_label,
            "filenames": _cifar_filenames(f"{batch_name}_image", per_batch),
        })
        splits[split].append(ExpectedSplit(images, labels))

    files["batches.meta"] = dumps_python2_pickle({
        "num_cases_per_batch": per_batch,
        "label_names": CIFAR10_CLASSES,
        "num_vis": 32 * 32 * 3,
    })
    files["readme.html"] = b"<html><body>CIFAR-10 python version (test archive)</body></html>\n"
    _write_tar_gz(dest_dir / "cifar-10-python.tar.gz", "cifar-10-batches-py", files)

    return {
        "train": _concatenate(splits["train"]),
        "test": _concatenate(splits["test"]),
        "classes": list(CIFAR10_CLASSES),
    }


def make_cifar100(
    dest_dir: str | Path, n_train: int = 20, n_test: int = 10, seed: int = 0
) -> dict[str, ExpectedSplit | list[str]]:
    """Write ``cifar-100-python.tar.gz`` with ``n_train`` and ``n_test`` images.

    Returns ``{"train", "test", "classes"}`` with the fine labels and the 100 fine
    class names; each split is in stored order. The coarse labels in the files are
    the superclasses of the fine labels.
    """
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    coarse_of_fine = {
        CIFAR100_FINE_CLASSES.index(fine): CIFAR100_COARSE_CLASSES.index(coarse)
        for coarse, fines in CIFAR100_SUPERCLASSES.items()
        for fine in fines
    }

    files: dict[str, bytes] = {}
    expected: dict[str, ExpectedSplit | list[str]] = {}
    for split, count, batch_label in [
        ("train", n_train, "training batch 1 of 1"),
        ("test", n_test, "testing batch 1 of 1"),
    ]:
        images = _random_images(rng, count, 32, 3)
        fine_labels = _random_labels(rng, count, len(CIFAR100_FINE_CLASSES))
        files[split] = dumps_python2_pickle({
            "filenames": _cifar_filenames(f"{split}_image", count),
            "batch_label": batch_label,
            "fine_labels": fine_labels.tolist(),
            "coarse_labels": [coarse_of_fine[int(label)] for label in fine_labels],
            "data": _to_channel_planar(images),
        })
        expected[split] = ExpectedSplit(images, fine_labels)

    files["meta"] = dumps_python2_pickle({
        "fine_label_names": CIFAR100_FINE_CLASSES,
        "coarse_label_names": CIFAR100_COARSE_CLASSES,
    })
    _write_tar_gz(dest_dir / "cifar-100-python.tar.gz", "cifar-100-python", files)

    expected["classes"] = list(CIFAR100_FINE_CLASSES)
    return expected


def _concatenate(parts: list[ExpectedSplit]) -> ExpectedSplit:
    return ExpectedSplit(
        np.concatenate([part.images for part in parts]),
        np.concatenate([part.labels for part in parts]),
    )


# ---------------------------------------------------------------------------
# STL-10
# ---------------------------------------------------------------------------


def make_stl10(
    dest_dir: str | Path,
    n_train: int = 10,
    n_test: int = 10,
    n_unlabeled: int = 12,
    seed: int = 0,
    image_size: int = 96,
) -> dict[str, ExpectedSplit | list[str]]:
    """Write ``stl10_binary.tar.gz`` with the three splits, class names and folds.

    Each image is stored as three planes (R, G, B), each plane column-major, so
    the stored array is (N, C, W, H). Returns ``{"train", "test", "unlabeled",
    "classes"}``, each split in stored order, with label -1 for every unlabeled
    image. Only ``image_size=96`` is the official format.
    """
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)

    files: dict[str, bytes] = {}
    expected: dict[str, ExpectedSplit | list[str]] = {}
    for split, count in [("train", n_train), ("test", n_test)]:
        images = _random_images(rng, count, image_size, 3)
        labels = _random_labels(rng, count, len(STL10_CLASSES))
        files[f"{split}_X.bin"] = _to_column_major_planes(images).tobytes()
        files[f"{split}_y.bin"] = (labels + 1).astype(np.uint8).tobytes()
        expected[split] = ExpectedSplit(images, labels)

    unlabeled = _random_images(rng, n_unlabeled, image_size, 3)
    files["unlabeled_X.bin"] = _to_column_major_planes(unlabeled).tobytes()
    expected["unlabeled"] = ExpectedSplit(unlabeled, np.full(n_unlabeled, -1, dtype=np.int64))

    files["class_names.txt"] = "".join(f"{name}\n" for name in STL10_CLASSES).encode("ascii")
    files["fold_indices.txt"] = _stl10_fold_indices(rng, n_train).encode("ascii")
    _write_tar_gz(dest_dir / "stl10_binary.tar.gz", "stl10_binary", files)

    expected["classes"] = list(STL10_CLASSES)
    return expected


def _to_column_major_planes(images: np.ndarray) -> np.ndarray:
    """Reorder (N, H, W, C) images to the stored (N, C, W, H) layout."""
    return np.ascontiguousarray(images.transpose(0, 3, 2, 1))


def _stl10_fold_indices(rng: np.random.Generator, n_train: int) -> str:
    """Draw 10 folds of 0-based train indices, each a fifth of the train split.

    The real file has 10 folds of 1000 indices into the 5000 train images.
    """
    # NOTE: it is not checked whether the real file ends each line with a space.
    # These lines end at the last index, and a reader should split on whitespace.
    fold_size = max(1, n_train // 5)
    lines = []
    for _ in range(10):
        fold = rng.permutation(n_train)[:fold_size]
        lines.append(" ".join(str(index) for index in fold) + "\n")
    return "".join(lines)


# ---------------------------------------------------------------------------
# Tiny ImageNet
# ---------------------------------------------------------------------------


def make_tinyimagenet(
    dest_dir: str | Path, n_classes: int = 3, per_class: int = 2, n_val: int = 4, seed: int = 0
) -> dict[str, ExpectedSplit | list[str]]:
    """Write ``tiny-imagenet-200.zip`` with ``n_classes`` classes of 64x64 JPEGs.

    wnids.txt lists the wnids in reverse sorted order, so a reader that does not
    sort them gets the wrong label indices. The last train image of the first
    class, the last val image and the first test image are grayscale JPEGs.

    Returns ``{"train", "test", "classes", "wnids"}``:
    - ``wnids``: the wnids sorted; a label is the index into this list.
    - ``classes``: for each sorted wnid, the first comma-separated name in words.txt.
    - ``train``: ordered by sorted wnid, then by the numeric image index
      (``<wnid>_0.JPEG``, ``<wnid>_1.JPEG``, ..., ``<wnid>_10.JPEG``).
    - ``test``: the labelled val split, ordered by the numeric index of
      ``val_<i>.JPEG``. The unlabeled test/ folder is not returned.

    Expected images are what PIL decodes from the written JPEG bytes, converted to
    RGB, because JPEG is lossy.
    """
    if not 1 <= n_classes <= len(TINYIMAGENET_WORDS):
        raise ValueError(f"n_classes must be in [1, {len(TINYIMAGENET_WORDS)}], got {n_classes}")
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    wnids = sorted(TINYIMAGENET_WORDS)[:n_classes]
    root = "tiny-imagenet-200"
    files: dict[str, bytes] = {}

    files["wnids.txt"] = "".join(f"{wnid}\n" for wnid in reversed(wnids)).encode("ascii")
    words = {**TINYIMAGENET_WORDS, **WORDNET_EXTRA_WORDS}
    files["words.txt"] = "".join(f"{wnid}\t{words[wnid]}\n" for wnid in sorted(words)).encode("utf-8")

    train_images, train_labels = [], []
    for label, wnid in enumerate(wnids):
        boxes = []
        for index in range(per_class):
            grayscale = label == 0 and index == per_class - 1
            data, decoded = _encode_jpeg(rng, grayscale)
            files[f"train/{wnid}/images/{wnid}_{index}.JPEG"] = data
            boxes.append(f"{wnid}_{index}.JPEG\t{_random_box(rng)}\n")
            train_images.append(decoded)
            train_labels.append(label)
        files[f"train/{wnid}/{wnid}_boxes.txt"] = "".join(boxes).encode("ascii")

    val_images = []
    val_labels = _random_labels(rng, n_val, n_classes)
    annotations = []
    for index, label in enumerate(val_labels):
        data, decoded = _encode_jpeg(rng, grayscale=index == n_val - 1)
        files[f"val/images/val_{index}.JPEG"] = data
        annotations.append(f"val_{index}.JPEG\t{wnids[label]}\t{_random_box(rng)}\n")
        val_images.append(decoded)
    files["val/val_annotations.txt"] = "".join(annotations).encode("ascii")

    for index in range(2):
        files[f"test/images/test_{index}.JPEG"], _ = _encode_jpeg(rng, grayscale=index == 0)

    _write_zip(dest_dir / "tiny-imagenet-200.zip", root, files)

    return {
        "train": ExpectedSplit(np.stack(train_images), np.array(train_labels, dtype=np.int64)),
        "test": ExpectedSplit(np.stack(val_images), val_labels),
        "classes": [words[wnid].split(",")[0].strip() for wnid in wnids],
        "wnids": wnids,
    }


def _encode_jpeg(rng: np.random.Generator, grayscale: bool) -> tuple[bytes, np.ndarray]:
    """Encode a random 64x64 JPEG and return its bytes and PIL's RGB decoding of them."""
    if grayscale:
        image = Image.fromarray(rng.integers(0, 256, size=(64, 64), dtype=np.uint8), mode="L")
    else:
        image = Image.fromarray(_random_images(rng, 1, 64, 3)[0], mode="RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    data = buffer.getvalue()

    with Image.open(io.BytesIO(data)) as decoded:
        return data, np.asarray(decoded.convert("RGB"))


def _random_box(rng: np.random.Generator) -> str:
    x0, y0 = rng.integers(0, 32, size=2)
    x1, y1 = rng.integers(32, 64, size=2)
    return f"{x0}\t{y0}\t{x1}\t{y1}"


def _write_zip(path: Path, root: str, files: dict[str, bytes]) -> None:
    """Write a zip archive under ``root/`` with an entry for every directory, as the real one has."""
    directories = {root}
    for name in files:
        parts = name.split("/")[:-1]
        for depth in range(1, len(parts) + 1):
            directories.add(f"{root}/{'/'.join(parts[:depth])}")

    with zipfile.ZipFile(path, "w") as archive:
        for directory in sorted(directories):
            info = zipfile.ZipInfo(f"{directory}/", date_time=_ZIP_DATE_TIME)
            info.external_attr = (0o40755 << 16) | 0x10
            archive.writestr(info, b"")
        for name, data in files.items():
            info = zipfile.ZipInfo(f"{root}/{name}", date_time=_ZIP_DATE_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o100644 << 16
            archive.writestr(info, data)


# ---------------------------------------------------------------------------
# Fashion-MNIST
# ---------------------------------------------------------------------------


def make_fashionmnist(
    dest_dir: str | Path, n_train: int = 20, n_test: int = 10, seed: int = 0
) -> dict[str, ExpectedSplit | list[str]]:
    """Write the four gzip-compressed IDX files of Fashion-MNIST into ``dest_dir``.

    Returns ``{"train", "test", "classes"}``, each split in stored order, with
    images of shape (N, 28, 28, 1).
    """
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)

    expected: dict[str, ExpectedSplit | list[str]] = {}
    for split, prefix, count in [("train", "train", n_train), ("test", "t10k", n_test)]:
        images = _random_images(rng, count, 28, 1)
        labels = _random_labels(rng, count, len(FASHIONMNIST_CLASSES))
        image_header = struct.pack(">IIII", 2051, count, 28, 28)
        label_header = struct.pack(">II", 2049, count)
        _write_gzip(dest_dir / f"{prefix}-images-idx3-ubyte.gz", image_header + images.tobytes())
        _write_gzip(dest_dir / f"{prefix}-labels-idx1-ubyte.gz", label_header + labels.astype(np.uint8).tobytes())
        expected[split] = ExpectedSplit(images, labels)

    expected["classes"] = list(FASHIONMNIST_CLASSES)
    return expected


def _write_gzip(path: Path, data: bytes) -> None:
    with open(path, "wb") as raw, gzip.GzipFile(filename="", fileobj=raw, mode="wb", mtime=_ARCHIVE_MTIME) as compressed:
        compressed.write(data)
