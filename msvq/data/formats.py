"""Readers of the official archive formats, writing uint8 N x H x W x C arrays.

Each reader takes the raw directory and a PreparedWriter, fills one images array
and one labels array per split, and returns the class names. Archives are read
member by member without extracting them to disk. Before any member is read,
every member name is checked, and an archive with a member that would land outside
the target directory if extracted is rejected.
"""

from __future__ import annotations

import gzip
import io
import pickle
import re
import struct
import tarfile
import zipfile
import zlib
from pathlib import Path, PurePosixPath
from typing import Callable

import numpy as np
from PIL import Image
from tqdm import tqdm


class ArchiveError(ValueError):
    """An archive that is unsafe to extract or does not follow the official format."""


class PreparedWriter:
    """Creates the .npy arrays of a prepared dataset inside a staging directory."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.splits: dict[str, int] = {}
        self.shape: tuple[int, int, int] | None = None

    def images(self, split: str, count: int, height: int, width: int, channels: int) -> np.memmap:
        """Return a writable memory-mapped uint8 array (count, height, width, channels)."""
        if self.shape not in (None, (height, width, channels)):
            raise ArchiveError(f"split {split} has images of shape {(height, width, channels)}, others {self.shape}")
        self.shape = (height, width, channels)
        self.splits[split] = count
        path = self.directory / f"{split}_images.npy"
        return np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(count, height, width, channels))

    def labels(self, split: str, labels: np.ndarray) -> None:
        labels = np.asarray(labels, dtype=np.int64)
        if split in self.splits and len(labels) != self.splits[split]:
            raise ArchiveError(f"split {split}: {self.splits[split]} images but {len(labels)} labels")
        np.save(self.directory / f"{split}_labels.npy", labels)


# --- archive safety -------------------------------------------------------------


def check_member_name(archive: Path, name: str) -> None:
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or ".." in path.parts or re.match(r"^[A-Za-z]:", name):
        raise ArchiveError(
            f"archive {archive} has member {name!r} that would be extracted outside the "
            "target directory; refusing to read it. Delete the file and download it again."
        )


def check_tar(archive: Path, tar: tarfile.TarFile) -> list[tarfile.TarInfo]:
    members = tar.getmembers()
    for member in members:
        check_member_name(archive, member.name)
        if member.issym() or member.islnk():
            target = PurePosixPath(member.name).parent / member.linkname
            check_member_name(archive, str(target) if not member.linkname.startswith("/") else member.linkname)
        elif not (member.isfile() or member.isdir()):
            raise ArchiveError(f"archive {archive} has member {member.name!r} of unsupported type; refusing to read it")
    return members


def check_zip(archive: Path, handle: zipfile.ZipFile) -> list[str]:
    names = handle.namelist()
    for name in names:
        check_member_name(archive, name)
    return names


def open_tar(archive: Path) -> tuple[tarfile.TarFile, dict[str, tarfile.TarInfo]]:
    try:
        tar = tarfile.open(archive, "r:*")
        members = check_tar(archive, tar)
    except (tarfile.TarError, OSError, EOFError) as error:
        raise ArchiveError(f"cannot read archive {archive}: {error}. Delete it and download it again.") from error
    return tar, {member.name: member for member in members if member.isfile()}


def read_member(archive: Path, tar: tarfile.TarFile, members: dict[str, tarfile.TarInfo], name: str) -> bytes:
    if name not in members:
        raise ArchiveError(f"archive {archive} has no member {name!r}; is it the official release?")
    handle = tar.extractfile(members[name])
    assert handle is not None
    return handle.read()


# --- CIFAR ----------------------------------------------------------------------


class _CifarUnpickler(pickle.Unpickler):
    """Loads the CIFAR pickles while allowing only numpy's array reconstruction."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("copy_reg", "_reconstructor"),
        ("copyreg", "_reconstructor"),
        ("__builtin__", "object"),
        ("builtins", "object"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name} in a CIFAR pickle")
        if module == "numpy.core.multiarray":
            module = "numpy._core.multiarray" if hasattr(np, "_core") else module
        if module == "copy_reg":
            module = "copyreg"
        if module == "__builtin__":
            module = "builtins"
        return super().find_class(module, name)


def load_cifar_pickle(archive: Path, data: bytes, member: str) -> dict[str, object]:
    try:
        return _CifarUnpickler(io.BytesIO(data), encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as error:
        raise ArchiveError(f"{archive}: member {member} is not a CIFAR pickle: {error}") from error


def cifar_images(archive: Path, batch: dict[str, object], member: str) -> np.ndarray:
    data = np.asarray(batch.get("data"))
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise ArchiveError(f"{archive}: {member} 'data' is {data.dtype} {data.shape}, expected uint8 (N, 3072)")
    # Rows are channel-planar: 1024 red, 1024 green, 1024 blue values, each row-major.
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)


def write_cifar(
    archive: Path, writer: PreparedWriter, splits: dict[str, list[str]], label_key: str, meta_member: str, names_key: str
) -> list[str]:
    tar, members = open_tar(archive)
    with tar:
        for split, member_names in splits.items():
            images, labels = [], []
            for name in member_names:
                batch = load_cifar_pickle(archive, read_member(archive, tar, members, name), name)
                images.append(cifar_images(archive, batch, name))
                labels.extend(batch[label_key])
            stacked = np.concatenate(images)
            out = writer.images(split, len(stacked), 32, 32, 3)
            out[:] = stacked
            out.flush()
            writer.labels(split, np.asarray(labels))
        meta = load_cifar_pickle(archive, read_member(archive, tar, members, meta_member), meta_member)
    return [str(name) for name in meta[names_key]]


def read_cifar10(raw_dir: Path, writer: PreparedWriter) -> list[str]:
    folder = "cifar-10-batches-py"
    train = [f"{folder}/data_batch_{i}" for i in range(1, 6)]
    return write_cifar(
        raw_dir / "cifar-10-python.tar.gz", writer, {"train": train, "test": [f"{folder}/test_batch"]},
        "labels", f"{folder}/batches.meta", "label_names",
    )


def read_cifar100(raw_dir: Path, writer: PreparedWriter) -> list[str]:
    folder = "cifar-100-python"
    return write_cifar(
        raw_dir / "cifar-100-python.tar.gz", writer, {"train": [f"{folder}/train"], "test": [f"{folder}/test"]},
        "fine_labels", f"{folder}/meta", "fine_label_names",
    )


# --- STL-10 ---------------------------------------------------------------------

STL_SIZE = 96
STL_IMAGE_BYTES = 3 * STL_SIZE * STL_SIZE


def copy_stl_images(archive: Path, handle, count: int, out: np.ndarray, desc: str, chunk: int = 1000) -> None:
    """Stream STL-10 images into ``out``, transposing each column-major plane."""
    with tqdm(total=count, desc=desc, unit="img", disable=count < 10 * chunk) as bar:
        for start in range(0, count, chunk):
            n = min(chunk, count - start)
            data = handle.read(n * STL_IMAGE_BYTES)
            if len(data) != n * STL_IMAGE_BYTES:
                raise ArchiveError(f"{archive}: {desc} ends after {start + len(data) // STL_IMAGE_BYTES} images")
            planes = np.frombuffer(data, dtype=np.uint8).reshape(n, 3, STL_SIZE, STL_SIZE)
            # Each plane is stored column-major: axis 2 is the column, axis 3 the row.
            out[start : start + n] = planes.transpose(0, 3, 2, 1)
            bar.update(n)
    out.flush()


def read_stl10(raw_dir: Path, writer: PreparedWriter) -> list[str]:
    archive = raw_dir / "stl10_binary.tar.gz"
    folder = "stl10_binary"
    tar, members = open_tar(archive)
    with tar:
        required = ["train_X.bin", "train_y.bin", "test_X.bin", "test_y.bin", "unlabeled_X.bin", "class_names.txt"]
        for name in required:
            if f"{folder}/{name}" not in members:
                raise ArchiveError(f"archive {archive} has no member '{folder}/{name}'; is it the official release?")
        # Read members in archive order so the gzip stream is decompressed once.
        for name in sorted(required, key=lambda n: members[f"{folder}/{n}"].offset_data):
            member = members[f"{folder}/{name}"]
            handle = tar.extractfile(member)
            assert handle is not None
            split = name.split("_")[0]
            if name.endswith("_X.bin"):
                if member.size % STL_IMAGE_BYTES:
                    raise ArchiveError(f"{archive}: {name} has {member.size} bytes, not a multiple of {STL_IMAGE_BYTES}")
                count = member.size // STL_IMAGE_BYTES
                copy_stl_images(archive, handle, count, writer.images(split, count, STL_SIZE, STL_SIZE, 3), name)
                if split == "unlabeled":
                    writer.labels(split, np.full(count, -1))
            elif name.endswith("_y.bin"):
                labels = np.frombuffer(handle.read(), dtype=np.uint8).astype(np.int64)
                if labels.size and (labels.min() < 1 or labels.max() > 10):
                    raise ArchiveError(f"{archive}: {name} has labels outside 1-10")
                # Labels are stored 1-10.
                writer.labels(split, labels - 1)
            else:
                classes = handle.read().decode().split()
    return classes


# --- Tiny ImageNet --------------------------------------------------------------

TINY_ROOT = "tiny-imagenet-200"
TINY_TRAIN = re.compile(rf"^{TINY_ROOT}/train/(n\d+)/images/\1_(\d+)\.JPEG$")
TINY_VAL = re.compile(rf"^{TINY_ROOT}/val/images/(val_(\d+)\.JPEG)$")


def decode_rgb(archive: Path, data: bytes, name: str, size: int) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as image:
            array = np.asarray(image.convert("RGB"))
    except OSError as error:
        raise ArchiveError(f"{archive}: cannot decode {name}: {error}") from error
    if array.shape != (size, size, 3):
        raise ArchiveError(f"{archive}: {name} is {array.shape[1]}x{array.shape[0]}, expected {size}x{size}")
    return array


def read_tinyimagenet(raw_dir: Path, writer: PreparedWriter) -> list[str]:
    archive = raw_dir / "tiny-imagenet-200.zip"
    size = 64
    try:
        handle = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as error:
        raise ArchiveError(f"cannot read archive {archive}: {error}. Delete it and download it again.") from error
    with handle:
        names = set(check_zip(archive, handle))

        def text(member: str) -> str:
            if member not in names:
                raise ArchiveError(f"archive {archive} has no member {member!r}; is it the official release?")
            return handle.read(member).decode()

        wnids = sorted(text(f"{TINY_ROOT}/wnids.txt").split())
        index = {wnid: i for i, wnid in enumerate(wnids)}
        words = dict(line.split("\t", 1) for line in text(f"{TINY_ROOT}/words.txt").splitlines() if "\t" in line)
        classes = [words.get(wnid, wnid).split(",")[0].strip() for wnid in wnids]

        train = []
        for name in names:
            match = TINY_TRAIN.match(name)
            if match:
                if match.group(1) not in index:
                    raise ArchiveError(f"{archive}: {name} belongs to {match.group(1)}, which is not in wnids.txt")
                train.append((index[match.group(1)], int(match.group(2)), name))
        train.sort()
        per_class = np.bincount([label for label, _, _ in train], minlength=len(wnids))
        empty = [wnids[i] for i in np.flatnonzero(per_class == 0)]
        if empty:
            raise ArchiveError(f"{archive}: no train images for class(es) {', '.join(empty[:5])}")

        annotations = {}
        for line in text(f"{TINY_ROOT}/val/val_annotations.txt").splitlines():
            fields = line.split("\t")
            if len(fields) < 2:
                continue
            if fields[1] not in index:
                raise ArchiveError(f"{archive}: val_annotations.txt gives unknown wnid {fields[1]!r} for {fields[0]}")
            annotations[fields[0]] = index[fields[1]]
        val = []
        for name in names:
            match = TINY_VAL.match(name)
            if match:
                if match.group(1) not in annotations:
                    raise ArchiveError(f"{archive}: {name} has no line in val/val_annotations.txt")
                val.append((int(match.group(2)), annotations[match.group(1)], name))
        val.sort()
        if len(val) != len(annotations):
            raise ArchiveError(
                f"{archive}: val_annotations.txt lists {len(annotations)} images but val/images contains {len(val)}"
            )

        for split, rows in (("train", [(name, label) for label, _, name in train]),
                            ("test", [(name, label) for _, label, name in val])):
            out = writer.images(split, len(rows), size, size, 3)
            for i, (name, _) in enumerate(tqdm(rows, desc=f"tinyimagenet {split}", unit="img", disable=len(rows) < 1000)):
                out[i] = decode_rgb(archive, handle.read(name), name, size)
            out.flush()
            writer.labels(split, np.asarray([label for _, label in rows]))
    return classes


# --- IDX (Fashion-MNIST) --------------------------------------------------------

FASHION_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
IDX_IMAGES, IDX_LABELS = 2051, 2049


def read_idx(path: Path, magic: int) -> np.ndarray:
    try:
        with gzip.open(path, "rb") as handle:
            data = handle.read()
    except (OSError, EOFError, zlib.error) as error:
        raise ArchiveError(f"cannot read {path}: {error}. Delete it and download it again.") from error
    dims = 3 if magic == IDX_IMAGES else 1
    header = 4 + 4 * dims
    if len(data) < header:
        raise ArchiveError(f"{path}: only {len(data)} bytes, shorter than an IDX header")
    found, *shape = struct.unpack(f">{1 + dims}I", data[:header])
    if found != magic:
        raise ArchiveError(f"{path}: IDX magic number {found}, expected {magic}")
    expected = int(np.prod(shape))
    if len(data) - header != expected:
        raise ArchiveError(f"{path}: {len(data) - header} payload bytes, header announces {expected}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def read_fashionmnist(raw_dir: Path, writer: PreparedWriter) -> list[str]:
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = read_idx(raw_dir / f"{prefix}-images-idx3-ubyte.gz", IDX_IMAGES)
        labels = read_idx(raw_dir / f"{prefix}-labels-idx1-ubyte.gz", IDX_LABELS)
        count, height, width = images.shape
        out = writer.images(split, count, height, width, 1)
        out[..., 0] = images
        out.flush()
        writer.labels(split, labels)
    return list(FASHION_CLASSES)


READERS: dict[str, Callable[[Path, PreparedWriter], list[str]]] = {
    "cifar10": read_cifar10,
    "cifar100": read_cifar100,
    "stl10": read_stl10,
    "tinyimagenet": read_tinyimagenet,
    "idx": read_fashionmnist,
}
