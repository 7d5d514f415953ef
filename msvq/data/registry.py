"""The five datasets: official files, checksums, mirrors and readers.

Archive URLs and MD5 digests are the ones the dataset authors publish (CIFAR:
cs.toronto.edu/~kriz/cifar.html, STL-10: cs.stanford.edu/~acoates/stl10,
Fashion-MNIST: the README of github.com/zalandoresearch/fashion-mnist). Tiny
ImageNet has no published digest; its MD5 is the one other loaders verify.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

MIRROR_ENV = "MSVQ_DATA_MIRROR"


@dataclass(frozen=True)
class RemoteFile:
    """One raw file of a dataset and how to recognise a good copy.

    ``content_md5`` is the MD5 of the decompressed stream of a gzip file. A copy
    whose archive digest differs but whose content digest matches is accepted,
    because repackaged copies (Debian's dataset-fashion-mnist) store the same IDX
    bytes in a gzip member with a different header.
    """

    name: str
    md5: str
    urls: tuple[str, ...]
    content_md5: str | None = None


@dataclass(frozen=True)
class DatasetSpec:
    """A dataset: its raw files, where copies may lie, and how to read them.

    ``reader`` names a function in msvq.data.formats. ``counts`` are the images
    per split of the official release, which prepare checks; None skips the check.
    """

    name: str
    reader: str
    files: tuple[RemoteFile, ...]
    counts: dict[str, int] | None = None
    mirrors: tuple[str, ...] = field(default=())


def _urls(base: str, name: str, *more: str) -> tuple[str, ...]:
    return (base + name, *(url + name for url in more))


FASHION_BASE = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
FASHION_GITHUB = "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/"

# The content digests are the MD5 of each decompressed IDX file, computed from the
# files of Debian's dataset-fashion-mnist 0.0~git20200523.55506a9-1.
FASHION_FILES = (
    ("train-images-idx3-ubyte.gz", "8d4fb7e6c68d591d4c3dfef9ec88bf0d", "f4a8712d7a061bf5bd6d2ca38dc4d50a"),
    ("train-labels-idx1-ubyte.gz", "25c81989df183df01b3e8a0aad5dffbe", "9018921c3c673c538a1fc5bad174d6f9"),
    ("t10k-images-idx3-ubyte.gz", "bef4ecab320f06d8554ea6380940ec79", "8181f5470baa50b63fa0f6fddb340f0a"),
    ("t10k-labels-idx1-ubyte.gz", "bb300cfdad3c16e7a12a480ee83cd310", "15d484375f8d13e6eb1aabb0c3f46965"),
)

DATASETS: dict[str, DatasetSpec] = {
    "cifar10": DatasetSpec(
        name="cifar10",
        reader="cifar10",
        files=(
            RemoteFile(
                "cifar-10-python.tar.gz",
                "c58f30108f718f92721af3b95e74349a",
                _urls("https://www.cs.toronto.edu/~kriz/", "cifar-10-python.tar.gz"),
            ),
        ),
        counts={"train": 50000, "test": 10000},
    ),
    "cifar100": DatasetSpec(
        name="cifar100",
        reader="cifar100",
        files=(
            RemoteFile(
                "cifar-100-python.tar.gz",
                "eb9058c3a382ffc7106e4002c42a8d85",
                _urls("https://www.cs.toronto.edu/~kriz/", "cifar-100-python.tar.gz"),
            ),
        ),
        counts={"train": 50000, "test": 10000},
    ),
    "stl10": DatasetSpec(
        name="stl10",
        reader="stl10",
        files=(
            RemoteFile(
                "stl10_binary.tar.gz",
                "91f7769df0f17e558f3565bffb0c7dfb",
                _urls("http://ai.stanford.edu/~acoates/stl10/", "stl10_binary.tar.gz"),
            ),
        ),
        counts={"train": 5000, "test": 8000, "unlabeled": 100000},
    ),
    "tinyimagenet": DatasetSpec(
        name="tinyimagenet",
        reader="tinyimagenet",
        files=(
            RemoteFile(
                "tiny-imagenet-200.zip",
                "90528d7ca1a48142e341f4ef8d21d0de",
                _urls("http://cs231n.stanford.edu/", "tiny-imagenet-200.zip"),
            ),
        ),
        counts={"train": 100000, "test": 10000},
    ),
    "fashionmnist": DatasetSpec(
        name="fashionmnist",
        reader="idx",
        files=tuple(
            RemoteFile(name, md5, _urls(FASHION_BASE, name, FASHION_GITHUB), content_md5)
            for name, md5, content_md5 in FASHION_FILES
        ),
        counts={"train": 60000, "test": 10000},
        mirrors=("/usr/share/datasets/fashion-mnist",),
    ),
}


def get_spec(name: str) -> DatasetSpec:
    try:
        return DATASETS[name]
    except KeyError:
        known = ", ".join(sorted(DATASETS))
        raise ValueError(f"unknown dataset {name!r}; known datasets: {known}") from None


def mirror_dirs(spec: DatasetSpec, extra: tuple[str, ...] | list[str] = ()) -> list[Path]:
    """Return the local directories searched for raw files, in search order.

    Order: directories given on the command line or in params, then
    $MSVQ_DATA_MIRROR (os.pathsep-separated), then the dataset's built-in mirrors.
    Each directory is searched directly and in a subdirectory named after the dataset.
    """
    env = [part for part in os.environ.get(MIRROR_ENV, "").split(os.pathsep) if part]
    dirs: list[Path] = []
    for entry in [*extra, *env, *spec.mirrors]:
        for candidate in (Path(entry), Path(entry) / spec.name):
            if candidate not in dirs:
                dirs.append(candidate)
    return dirs
